//! Built-in machines, each shipped as a TOML file under `presets/` in this crate and
//! compiled in, so `--preset NAME` and `--file presets/NAME.toml` give the same model.

use crate::fabric::error::FabricError;
use crate::fabric::import::file;
use crate::fabric::model::Topology;

/// `(name, what it is, TOML text)`.
pub const PRESETS: [(&str, &str, &str); 4] = [
    (
        "workstation",
        "two GPUs and an NVMe under one PCIe switch, another NVMe on its own root port",
        include_str!("../../../presets/workstation.toml"),
    ),
    (
        "dgx",
        "dual-socket server: 8 GPUs and 8 NICs under 4 PCIe switches, one per root port",
        include_str!("../../../presets/dgx.toml"),
    ),
    (
        "dgx-acs",
        "the dgx server with ACS request/completion redirect on every switch downstream port",
        include_str!("../../../presets/dgx-acs.toml"),
    ),
    (
        "q35",
        "a QEMU q35 guest: one flat root bus, no switch, host bridge 8086:29c0 (not allowlisted)",
        include_str!("../../../presets/q35.toml"),
    ),
];

/// The preset called `name`.
pub fn preset(name: &str) -> Result<Topology, FabricError> {
    let (n, _, text) =
        PRESETS
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| FabricError::UnknownPreset {
                name: name.to_string(),
                known: PRESETS.map(|p| p.0).join(", "),
            })?;
    file::parse(&format!("preset {n}"), text)
}
