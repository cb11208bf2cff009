//! The headline call on an emulated workstation: a process maps p2p memory from one
//! NVMe drive's controller memory buffer, pins and maps it for the other drive with
//! `get_user_dma_sg()`, and that drive reads a block straight into it through the PCIe
//! switch, by bus address. Run with `cargo run -p peerdma --example get_user_dma_sg`.

use std::os::unix::fs::FileExt;

use peerdma::dma::Direction;
use peerdma::drivers::nvme::{DataPointer, Nvme};
use peerdma::fabric::preset;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::host::{Host, HostConfig};
use peerdma::mm::Prot;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topo = preset("workstation")?;
    let devices = Host::nvme_specs(&topo, 16 << 20);
    let host = Host::build(
        topo,
        &HostConfig {
            ram_bytes: 64 << 20,
            iommu: Some(true),
        },
        &devices,
    )?;
    let a = host
        .device::<Nvme>("0000:06:00.0".parse()?)
        .ok_or("no drive A")?;
    let b = host
        .device::<Nvme>("0000:05:00.0".parse()?)
        .ok_or("no drive B")?;
    a.backing().write_all_at(b"hello from drive A", 0)?;

    // p2p memory from B's CMB, mapped into a process like the sysfs allocate file.
    let cmb = b.cmb().ok_or("drive B has no CMB")?.clone();
    let process = host.spawn();
    let buf = cmb.mmap(&process, 4096, true, 0, Prot::RW)?;

    // Pin it and map it for drive A in one call, then let A read block 0 into it.
    let sg = get_user_dma_sg(
        &process,
        a.dma(),
        UserSg::new(buf, 4096, Direction::FromDevice),
    )?;
    for s in sg.segments() {
        println!(
            "drive A reaches the buffer at {} ({:?}, {} bytes)",
            s.addr, s.kind, s.len
        );
    }
    a.read(0, 1, &DataPointer::for_segments(&sg.segments()))?;
    drop(sg); // unmaps, then unpins

    let mut text = [0u8; 18];
    process.read(buf, &mut text)?;
    println!("the process reads: {}", String::from_utf8_lossy(&text));
    println!(
        "bytes through the switch: {}",
        host.dma().stats().via_switch
    );
    assert!(host.dma().sanitizer().is_clean());
    Ok(())
}
