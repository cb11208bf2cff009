//! The NVMe model: CMB registration by nvme_map_cmb()'s rules, and read/write commands
//! whose PRP or SGL data pointers move real bytes between the namespace file and memory.

mod common;

use std::os::unix::fs::FileExt;

use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::dma::{Direction, Dma};
use peerdma::drivers::nvme::{CmbRegs, CmbStatus, DataPointer, Nvme, NvmeConfig, NvmeError};
use peerdma::fabric::preset;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::mem::PhysMem;
use peerdma::mm::Prot;
use peerdma::p2pmem::P2pRegistry;
use peerdma::sync::Arc;

fn dma() -> Arc<Dma> {
    Dma::new(
        Arc::new(preset("workstation").unwrap()),
        PhysMem::new(16 << 20).unwrap(),
        true,
    )
}

fn drive(d: &Arc<Dma>, cmb: Option<CmbRegs>) -> Arc<Nvme> {
    Nvme::new(
        &P2pRegistry::new(d),
        "0000:05:00.0".parse().unwrap(),
        NvmeConfig {
            capacity: 1 << 20,
            cmb,
            ..NvmeConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn cmb_is_registered_and_published_with_wds_and_rds() {
    let d = dma();
    let n = drive(&d, Some(CmbRegs::whole(2, 16 << 20, 0)));
    assert_eq!(
        n.cmb_status(),
        &CmbStatus::Registered {
            size: 16 << 20,
            published: true
        }
    );
    assert_eq!(n.cmb().unwrap().bus_addr().0, 0x60_0000_0000);
}

#[test]
fn cmb_larger_than_the_bar_is_clamped() {
    let d = dma();
    let n = drive(&d, Some(CmbRegs::whole(2, 128 << 20, 32 << 20)));
    assert_eq!(
        n.cmb_status(),
        &CmbStatus::Registered {
            size: 32 << 20,
            published: true
        }
    );
    assert_eq!(n.cmb().unwrap().bus_addr().0, 0x60_0000_0000 + (32 << 20));
}

#[test]
fn cmb_not_2mib_aligned_is_skipped() {
    let d = dma();
    let n = drive(&d, Some(CmbRegs::whole(2, 3 << 20, 0)));
    assert!(
        matches!(n.cmb_status(), CmbStatus::Skipped(why) if why.contains("2 MiB")),
        "{:?}",
        n.cmb_status()
    );
    assert!(n.cmb().is_none());
}

#[test]
fn cmb_without_both_data_directions_is_not_published() {
    let d = dma();
    let mut regs = CmbRegs::whole(2, 16 << 20, 0);
    regs.cmbsz &= !CmbRegs::WDS;
    let n = drive(&d, Some(regs));
    assert_eq!(
        n.cmb_status(),
        &CmbStatus::Registered {
            size: 16 << 20,
            published: false
        }
    );
    let regs = CmbRegs {
        cmbsz: 0,
        cmbloc: 0,
    };
    assert_eq!(drive(&d, Some(regs)).cmb_status(), &CmbStatus::Absent);
    let regs = CmbRegs::whole(5, 16 << 20, 0);
    assert!(matches!(
        drive(&d, Some(regs)).cmb_status(),
        CmbStatus::Skipped(_)
    ));
}

#[test]
fn a_cmb_that_is_not_used_says_why_in_words() {
    // What a report prints for each state: never an internal name.
    let d = dma();
    let mut regs = CmbRegs::whole(2, 16 << 20, 0);
    regs.cmbsz &= !CmbRegs::RDS;
    let unpublished = drive(&d, Some(regs)).cmb_status().to_string();
    assert!(
        unpublished.contains("not published (it lacks WDS or RDS)"),
        "{unpublished}"
    );
    let absent = CmbStatus::Absent.to_string();
    assert_eq!(absent, "the controller has no memory buffer (CMBSZ is 0)");
    let regs = CmbRegs::whole(5, 16 << 20, 0);
    let skipped = drive(&d, Some(regs)).cmb_status().to_string();
    assert!(skipped.contains("BAR 5"), "{skipped}");
}

#[test]
fn read_and_write_commands_move_bytes_with_prps_and_sgls() {
    let h = common::bare(16 << 20, true);
    let d = h.dma().clone();
    let n = drive(&d, None);
    let dev: Bdf = n.dev();
    let pattern: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i * 13 % 251) as u8).collect();
    n.backing().write_all_at(&pattern, 8 * 4096).unwrap();
    let mm = h.spawn();
    let buf = mm.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    // Page-aligned buffer: PRPs.
    let sg = get_user_dma_sg(
        &mm,
        &d.attach(dev).unwrap(),
        UserSg::new(buf, 3 * PAGE_SIZE, Direction::FromDevice),
    )
    .unwrap();
    let dp = DataPointer::for_segments(&sg.segments());
    assert!(matches!(dp, DataPointer::Prp(ref p) if p.len() == 3));
    n.read(8, 3, &dp).unwrap();
    drop(sg);
    let mut got = vec![0u8; pattern.len()];
    mm.read(buf, &mut got).unwrap();
    assert_eq!(got, pattern);
    // Write it back from an unaligned offset: an SGL.
    mm.write(peerdma::addr::VirtAddr(buf.0 + 100), &pattern[..4096])
        .unwrap();
    let sg = get_user_dma_sg(
        &mm,
        &d.attach(dev).unwrap(),
        UserSg::new(
            peerdma::addr::VirtAddr(buf.0 + 100),
            4096,
            Direction::ToDevice,
        ),
    )
    .unwrap();
    let dp = DataPointer::for_segments(&sg.segments());
    n.write(100, 1, &dp).unwrap();
    let mut back = vec![0u8; 4096];
    n.backing().read_exact_at(&mut back, 100 * 4096).unwrap();
    assert_eq!(back, &pattern[..4096]);
    // Out of range and short data pointers are errors, not panics.
    assert!(matches!(
        n.read(n.nlba(), 1, &dp),
        Err(NvmeError::LbaOutOfRange { .. })
    ));
    assert!(matches!(
        n.write(0, 2, &dp),
        Err(NvmeError::DataPointer { .. })
    ));
    assert!(d.sanitizer().is_clean());
}
