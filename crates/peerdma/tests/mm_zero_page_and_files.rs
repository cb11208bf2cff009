//! The shared zero page and file mappings, by mm/memory.c: `do_anonymous_page` maps the
//! zero page for a read of untouched private anonymous memory and `wp_page_copy`
//! replaces it on the first write; `do_read_fault` / `do_cow_fault` / `do_shared_fault`
//! for a file mapped private or shared; `gup_must_unshare` (mm/internal.h) for
//! read-only pins of the zero page and of file pages (tools/testing/selftests/mm/cow.c's
//! "shared zeropage" and "R/O pin on a file page" cases); `copy_present_pte` at fork.

mod common;

use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::gup::{get_user_pages, pin_user_pages, FollFlags};
use peerdma::mem::{flags, ZERO_PFN};
use peerdma::mm::{Prot, ShmObject};

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    VirtAddr(a.0 + i * PAGE_SIZE)
}

fn byte(p: &peerdma::mm::Mm, va: VirtAddr) -> u8 {
    let mut b = [0u8];
    p.read(va, &mut b).unwrap();
    b[0]
}

fn frame_byte(h: &peerdma::host::Host, pfn: peerdma::addr::Pfn) -> u8 {
    let mut b = [0u8];
    h.phys().region(pfn).unwrap().read(pfn, 0, &mut b);
    b[0]
}

#[test]
fn a_read_maps_the_zero_page_and_the_first_write_replaces_it() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(byte(&p, a), 0);
    let pte = p.pte(a);
    assert_eq!(pte.pfn(), Some(ZERO_PFN));
    assert!(!pte.writable(), "the zero page is never mapped writable");
    assert_eq!(
        h.quiescent().frames(),
        0,
        "no frame is allocated for a read"
    );
    p.write(a, &[7]).unwrap();
    let own = p.pte(a).pfn().unwrap();
    assert_ne!(own, ZERO_PFN);
    assert!(p.pte(a).writable());
    assert_eq!((byte(&p, a), frame_byte(&h, ZERO_PFN)), (7, 0));
    assert_eq!(h.quiescent().frames(), 1);
    // A write to a page never read allocates at once.
    p.write(page(a, 1), &[1]).unwrap();
    assert_ne!(p.pte(page(a, 1)).pfn(), Some(ZERO_PFN));
}

#[test]
fn fork_shares_the_zero_page_and_each_write_gets_its_own_page() {
    let h = common::host(16 << 20);
    let parent = h.spawn();
    let a = parent.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(byte(&parent, a), 0);
    let child = parent.fork().unwrap();
    assert_eq!(child.pte(a).pfn(), Some(ZERO_PFN));
    child.write(a, &[9]).unwrap();
    assert_eq!((byte(&parent, a), byte(&child, a)), (0, 9));
    assert_eq!(parent.pte(a).pfn(), Some(ZERO_PFN));
    assert_eq!(frame_byte(&h, ZERO_PFN), 0);
}

#[test]
fn a_short_term_read_only_pin_takes_the_zero_page_a_long_term_one_unshares_it() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    // gup_must_unshare() is false for a non-anonymous page without FOLL_LONGTERM.
    let short = pin_user_pages(&p, a, 1, FollFlags::NONE).unwrap();
    assert_eq!(short.pages(), [ZERO_PFN]);
    assert_eq!(p.pte(a).pfn(), Some(ZERO_PFN));
    short.unpin();
    // With FOLL_LONGTERM in a COW mapping it is true: the pin must stay coherent with
    // what the process writes later, so it gets an exclusive page of its own.
    let long = pin_user_pages(&p, page(a, 1), 1, FollFlags::LONGTERM).unwrap();
    let pinned = long.pages()[0];
    assert_ne!(pinned, ZERO_PFN);
    assert_eq!(p.pte(page(a, 1)).pfn(), Some(pinned));
    p.write(page(a, 1), &[5]).unwrap();
    assert_eq!(
        frame_byte(&h, pinned),
        5,
        "the write went to the pinned page"
    );
    long.unpin();
    // get_user_pages for reading takes the zero page too.
    let got = get_user_pages(&p, a, 1, FollFlags::NONE).unwrap();
    assert_eq!(got.pages(), [ZERO_PFN]);
}

#[test]
fn a_pinned_zero_page_shows_in_the_quiescence_report_until_unpinned() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::READ).unwrap();
    let pin = pin_user_pages(&p, a, 1, FollFlags::NONE).unwrap();
    assert_eq!(pin.pages(), [ZERO_PFN]);
    assert!(!h.quiescent().is_clean());
    pin.unpin();
    p.exit();
    assert!(h.quiescent().is_clean());
}

/// A tmpfs file of `pages` pages whose bytes are `f(page)`, written with pwrite.
fn file(
    h: &peerdma::host::Host,
    pages: u64,
    f: impl Fn(u64) -> u8,
) -> peerdma::sync::Arc<ShmObject> {
    let obj = ShmObject::new(h.phys(), pages * PAGE_SIZE);
    for i in 0..pages {
        let n = obj
            .pwrite(i * PAGE_SIZE, &[f(i); PAGE_SIZE as usize])
            .unwrap();
        assert_eq!(n, PAGE_SIZE as usize);
    }
    obj
}

#[test]
fn a_shared_file_mapping_writes_reach_the_file_and_pwrite_reaches_the_mapping() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let obj = file(&h, 2, |i| i as u8 + 1);
    let a = p.mmap_shared(&obj, 0, 2 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!((byte(&p, a), byte(&p, page(a, 1))), (1, 2));
    p.write(page(a, 1), &[0x55]).unwrap();
    let mut b = [0u8; 2];
    assert_eq!(obj.pread(PAGE_SIZE, &mut b), 2);
    assert_eq!(b, [0x55, 2]);
    obj.pwrite(0, &[0x66]).unwrap();
    assert_eq!(byte(&p, a), 0x66);
    // Reads past the end are short; writes past the end do not grow the file.
    let mut tail = [0u8; 8];
    assert_eq!(obj.pread(2 * PAGE_SIZE - 4, &mut tail), 4);
    assert_eq!(obj.pwrite(2 * PAGE_SIZE, &[1]).unwrap(), 0);
}

#[test]
fn a_private_file_mapping_reads_the_file_and_copies_on_the_first_write() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let obj = file(&h, 2, |i| i as u8 + 1);
    let a = p
        .mmap_private_file(&obj, 0, 2 * PAGE_SIZE, Prot::RW)
        .unwrap();
    // do_read_fault: the file's own page, read-only.
    assert_eq!(byte(&p, a), 1);
    let file_page = p.pte(a).pfn().unwrap();
    assert!(!p.pte(a).writable());
    assert!(h.phys().ram().meta(file_page).test(flags::PAGECACHE));
    // wp_page_copy: the write lands in a private copy; the file is untouched.
    p.write(a, &[0x77]).unwrap();
    assert_ne!(p.pte(a).pfn(), Some(file_page));
    let mut b = [0u8];
    obj.pread(0, &mut b);
    assert_eq!((b[0], byte(&p, a)), (1, 0x77));
    // A page not yet written still shows the file's later changes; a copied one not.
    obj.pwrite(PAGE_SIZE, &[0x42]).unwrap();
    obj.pwrite(0, &[0x43]).unwrap();
    assert_eq!((byte(&p, page(a, 1)), byte(&p, a)), (0x42, 0x77));
    // do_cow_fault: a write to an untouched page copies the file's bytes.
    let obj2 = file(&h, 1, |_| 0x31);
    let c = p.mmap_private_file(&obj2, 0, PAGE_SIZE, Prot::RW).unwrap();
    p.write(VirtAddr(c.0 + 1), &[0x32]).unwrap();
    let mut two = [0u8; 2];
    p.read(c, &mut two).unwrap();
    assert_eq!(two, [0x31, 0x32]);
    obj2.pread(0, &mut two);
    assert_eq!(two, [0x31, 0x31]);
}

#[test]
fn a_long_term_read_only_pin_of_a_private_file_page_copies_it_a_short_term_one_does_not() {
    let h = common::host(16 << 20);
    let p = h.spawn();
    let obj = file(&h, 1, |_| 3);
    let a = p.mmap_private_file(&obj, 0, PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(byte(&p, a), 3);
    let file_page = p.pte(a).pfn().unwrap();
    let short = pin_user_pages(&p, a, 1, FollFlags::NONE).unwrap();
    assert_eq!(short.pages(), [file_page]);
    short.unpin();
    let long = pin_user_pages(&p, a, 1, FollFlags::LONGTERM).unwrap();
    assert_ne!(long.pages()[0], file_page);
    assert_eq!(frame_byte(&h, long.pages()[0]), 3);
    long.unpin();
    // In a shared mapping nothing is copied: the file's page is what a pin must see.
    let s = p.mmap_shared(&obj, 0, PAGE_SIZE, Prot::RW).unwrap();
    let long = pin_user_pages(&p, s, 1, FollFlags::LONGTERM).unwrap();
    assert_eq!(long.pages(), [file_page]);
}

#[test]
fn fork_shares_file_pages_and_write_protects_the_private_copies() {
    let h = common::host(16 << 20);
    let parent = h.spawn();
    let obj = file(&h, 2, |_| 1);
    let a = parent
        .mmap_private_file(&obj, 0, 2 * PAGE_SIZE, Prot::RW)
        .unwrap();
    assert_eq!(byte(&parent, a), 1); // the file's page
    parent.write(page(a, 1), &[2]).unwrap(); // a private copy
    let child = parent.fork().unwrap();
    assert_eq!(child.pte(a).pfn(), parent.pte(a).pfn());
    assert!(
        !parent.pte(page(a, 1)).writable(),
        "the anonymous copy is COW now"
    );
    child.write(page(a, 1), &[3]).unwrap();
    parent.write(a, &[4]).unwrap();
    assert_eq!(
        (byte(&parent, a), byte(&parent, page(a, 1))),
        (4, 2),
        "the parent's view"
    );
    assert_eq!((byte(&child, a), byte(&child, page(a, 1))), (1, 3));
    let mut b = [0u8];
    obj.pread(0, &mut b);
    assert_eq!(b[0], 1, "nothing reached the file");
}
