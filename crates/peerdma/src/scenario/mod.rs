//! Workloads and scenarios run on a host (the selftests' layer): they use the host,
//! its processes and its devices only through the public calls a program or a driver
//! would make.

pub mod fuzz;
pub mod hmm_job;
pub mod lang;
pub mod p2p_copy;
pub mod rdma_job;
pub mod run;
pub mod steps;
pub mod vocab;

pub use run::{compile_text, load, Plan, ScenarioReport};
pub use vocab::Vocabulary;
