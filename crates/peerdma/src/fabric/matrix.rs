//! All-pairs view over a chosen set of functions: the `nvidia-smi topo -m` level and the
//! kernel's verdict for every pair, computed once from precomputed upstream paths.
//! The verdict is symmetric in map type, distance and certainty (the walks meet at the
//! same bridge and cross the same ports either way), so each pair is computed once.

use serde::Serialize;

use crate::fabric::model::{FnId, Topology};
use crate::fabric::p2p::{calc_with_paths, MapType};
use crate::fabric::path::{level_with_paths, TopoLevel};

/// One pair's summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// The `nvidia-smi topo -m` level.
    pub level: TopoLevel,
    /// The kernel's map type.
    pub map_type: MapType,
    /// The kernel's distance.
    pub distance: u32,
    /// Whether the verdict rests on state that could not be read.
    pub uncertain: bool,
}

/// The all-pairs matrix.
///
/// # Invariants
/// `cells.len() == ids.len()²`, row-major, row = provider, column = client.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// The functions, in row order.
    pub ids: Vec<FnId>,
    cells: Vec<Cell>,
}

impl Matrix {
    /// Computes every pair of `ids`.
    pub fn build(topo: &Topology, ids: &[FnId]) -> Self {
        let n = ids.len();
        let paths: Vec<Vec<FnId>> = ids.iter().map(|&id| topo.upstream_path(id)).collect();
        let blank = Cell {
            level: TopoLevel::X,
            map_type: MapType::BusAddr,
            distance: 0,
            uncertain: false,
        };
        let mut cells = vec![blank; n * n];
        for i in 0..n {
            for j in i..n {
                let v = calc_with_paths(topo, ids[i], ids[j], &paths[i], &paths[j]);
                let cell = Cell {
                    level: level_with_paths(topo, &paths[i], &paths[j]),
                    map_type: v.map_type,
                    distance: v.distance,
                    uncertain: v.uncertain(),
                };
                cells[i * n + j] = cell;
                cells[j * n + i] = cell;
            }
        }
        Matrix {
            ids: ids.to_vec(),
            cells,
        }
    }

    /// The cell for provider row `i`, client column `j`.
    pub fn get(&self, i: usize, j: usize) -> &Cell {
        &self.cells[i * self.ids.len() + j]
    }
}
