use super::worker::{discard, ram_region, DiscardError};
use super::*;
use crate::virtio::test_driver::{Desc, TestDriver, DATA_START};
use crate::virtio::worker::CHAINS_PER_WAKEUP;
use std::time::{Duration, Instant};
use vireo_vmcore::memory::{GuestMemory, GuestMemoryBackend};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 64 << 20;
const PAGE: u64 = BALLOON_PAGE_SIZE;
const ALL: u64 = features::VERSION_1
    | balloon_features::STATS_VQ
    | balloon_features::DEFLATE_ON_OOM
    | balloon_features::REPORTING;
/// The page lists and other driver buffers live here; the memory the
/// tests give back lies above.
const LIST: u64 = DATA_START;
const TOUCHED: u64 = 4 << 20;

/// A balloon on 64 MiB of guest memory whose every page from
/// `TOUCHED` up is allocated and filled with 0xab.
fn started(config: BalloonConfig, features: u64, enabled: &[u16]) -> (Balloon, TestDriver) {
    let mut b = Balloon::new(config).unwrap();
    let mut drv = TestDriver::new(MEM, &vec![QUEUE_SIZE; b.queue_max_sizes().len()]);
    let fill = vec![0xabu8; 1 << 20];
    let mut at = TOUCHED;
    while at < MEM as u64 {
        drv.mem.write_slice(&fill, GuestAddress(at)).unwrap();
        at += fill.len() as u64;
    }
    b.activate(drv.activation_of(features, enabled)).unwrap();
    (b, drv)
}

fn started_all() -> (Balloon, TestDriver) {
    started(BalloonConfig::default(), ALL, &[0, 1, 2, 3])
}

/// Is each 4 KiB page of `[gpa, gpa + len)` resident in host memory?
fn resident(drv: &TestDriver, gpa: u64, len: u64) -> Vec<bool> {
    let host = drv.mem.get_host_address(GuestAddress(gpa)).unwrap();
    let n = len.div_ceil(PAGE) as usize;
    let mut v = vec![0u8; n];
    // SAFETY: the range lies inside the test's guest mapping and `v`
    // has one byte per page.
    let r = unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().map(|b| b & 1 != 0).collect()
}

fn bytes(drv: &TestDriver, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    drv.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v
}

/// Write `pfns` as a page list at `at`; returns its length in bytes.
fn page_list(drv: &TestDriver, at: u64, pfns: &[u32]) -> u32 {
    let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    drv.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    raw.len() as u32
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn page_lists_and_reports_beyond_the_budget_are_served_on_later_wakeups() {
    // ALL has no EVENT_IDX: each wakeup that used chains interrupts.
    let (_b, mut drv) = started_all();
    // Page lists naming a frame outside guest RAM: returned, ignored.
    let outside = (MEM as u64 / PAGE) as u32 + 10;
    let len = page_list(&drv, LIST, &[outside]);
    for q in [0u16, 1] {
        drv.served_over_wakeups(
            q,
            200,
            CHAINS_PER_WAKEUP,
            |_| Desc::readable(LIST, len),
            |_| 0,
        );
    }
    // Free page reports smaller than a page: nothing to discard.
    drv.served_over_wakeups(
        3,
        200,
        CHAINS_PER_WAKEUP,
        |i| Desc::writable(TOUCHED + u64::from(i) * PAGE + 1, 16),
        |_| 0,
    );
    assert!(resident(&drv, TOUCHED, 200 * PAGE).iter().all(|r| *r));
}

#[test]
fn options_features_and_queues() {
    let c = BalloonConfig::from_options("target=512,deflate_on_oom=off").unwrap();

    let b = Balloon::new(c).unwrap();
    let f = b.features();
    assert_ne!(f & features::VERSION_1, 0);
    assert_ne!(f & balloon_features::STATS_VQ, 0);
    assert_ne!(f & balloon_features::REPORTING, 0);
    assert_eq!(f & balloon_features::DEFLATE_ON_OOM, 0);
    assert_eq!(
        f & (balloon_features::FREE_PAGE_HINT | balloon_features::MUST_TELL_HOST),
        0
    );
    assert_eq!(b.queue_max_sizes().len(), 4);
    let b = Balloon::new(BalloonConfig::from_options("free_page_reporting=off").unwrap()).unwrap();
    assert_eq!(b.features() & balloon_features::REPORTING, 0);
    assert_eq!(b.queue_max_sizes().len(), 3);
}

#[test]
fn config_space_target_and_actual() {
    let mut b = Balloon::new(BalloonConfig::from_options("target=64").unwrap()).unwrap();
    let h = b.handle();
    let mut d = [0u8; 8];
    b.read_config(0, &mut d);
    assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 64 * 256);
    // The driver writes actual; num_pages ignores writes.
    b.write_config(4, &(32u32 * 256).to_le_bytes());
    b.write_config(0, &7u32.to_le_bytes());
    assert_eq!(h.actual_mib(), 32);
    assert_eq!(h.target_mib(), 64);
    // Byte-wise writes land too, and reads past the end are zero.
    b.write_config(5, &[0x40]);
    assert_eq!(h.state().actual, 0x4000);
    let mut d = [0xffu8; 4];
    b.read_config(8, &mut d);
    assert_eq!(d, [0; 4]);

    // Not active: the target changes without an interrupt.
    let mut drv = TestDriver::new(1 << 20, &[QUEUE_SIZE; 4]);
    h.set_target_mib(100).unwrap();
    assert_eq!(drv.interrupt.count(InterruptKind::Config), 0);
    b.activate(drv.activation_of(ALL, &[0, 1, 2, 3])).unwrap();
    h.set_target_mib(200).unwrap();
    assert_eq!(drv.interrupt.count(InterruptKind::Config), 1);
    let mut d = [0u8; 4];
    b.read_config(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 200 * 256);
    assert!(matches!(
        h.set_target_mib(1 << 40),
        Err(BalloonError::TargetTooLarge { .. })
    ));
    assert_eq!(h.target_mib(), 200);
}

#[test]
fn inflated_pages_go_back_to_the_host_and_read_as_zeros() {
    let (_b, mut drv) = started_all();
    let h = _b.handle();
    // 4 MiB at 16 MiB in one run, and every other page of 32..33 MiB.
    let run: Vec<u32> = (0..1024).map(|i| ((16 << 20) / PAGE) as u32 + i).collect();
    let sparse: Vec<u32> = (0..128)
        .map(|i| ((32 << 20) / PAGE) as u32 + 2 * i)
        .collect();
    assert!(resident(&drv, 16 << 20, 4 << 20).iter().all(|r| *r));
    let l1 = page_list(&drv, LIST, &run);
    let l2 = page_list(&drv, LIST + 0x1000, &sparse);
    let h1 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l1)]);
    let h2 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST + 0x1000, l2)]);
    drv.kick(INFLATEQ);
    assert_eq!(drv.used(INFLATEQ), (h1, 0));
    assert_eq!(drv.used(INFLATEQ), (h2, 0));
    assert!(drv.interrupt.raised(InterruptKind::Queue(INFLATEQ), 1));

    // Host memory is released: not resident any more...
    assert!(resident(&drv, 16 << 20, 4 << 20).iter().all(|r| !*r));
    let sparse_res = resident(&drv, 32 << 20, 1 << 20);
    for (i, r) in sparse_res.iter().enumerate() {
        assert_eq!(*r, i % 2 == 1, "page {i} of 32 MiB");
    }
    // ...the neighbours are untouched...
    assert!(resident(&drv, (16 << 20) - PAGE, PAGE)[0]);
    assert!(resident(&drv, 20 << 20, PAGE)[0]);
    assert_eq!(bytes(&drv, (16 << 20) - 16, 16), vec![0xab; 16]);
    assert_eq!(bytes(&drv, 20 << 20, 16), vec![0xab; 16]);
    assert_eq!(
        bytes(&drv, (32 << 20) + PAGE, PAGE as usize),
        vec![0xab; PAGE as usize]
    );
    // ...and the guest reads zeros from the pages it gave up.
    assert!(bytes(&drv, 16 << 20, 4 << 20).iter().all(|b| *b == 0));
    assert_eq!(bytes(&drv, 32 << 20, PAGE as usize), vec![0; PAGE as usize]);
    assert_eq!(h.state().inflated_pages, 1024 + 128);

    // Deflating is bookkeeping only.
    let l3 = page_list(&drv, LIST + 0x2000, &run[..10]);
    let h3 = drv.add_chain(DEFLATEQ, &[Desc::readable(LIST + 0x2000, l3)]);
    drv.kick(DEFLATEQ);
    assert_eq!(drv.used(DEFLATEQ), (h3, 0));
    assert_eq!(h.state().deflated_pages, 10);
}

#[test]
fn hostile_page_lists_touch_nothing_outside_ram_or_not_listed() {
    let (b, mut drv) = started_all();
    let h = b.handle();
    let target = ((8 << 20) / PAGE) as u32;
    let beyond = (MEM as u64 / PAGE) as u32;
    // Outside RAM (just past the end, and the largest frame number) next
    // to one good frame.
    let l = page_list(&drv, LIST, &[beyond, u32::MAX, target]);
    let h1 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
    // A device-writable buffer holding a page list: skipped.
    page_list(&drv, LIST + 0x1000, &[target + 1]);
    let h2 = drv.add_chain(INFLATEQ, &[Desc::writable(LIST + 0x1000, 4)]);
    // Odd length: two whole frame numbers and three stray bytes.
    page_list(&drv, LIST + 0x2000, &[target + 2, target + 3, target + 4]);
    let h3 = drv.add_chain(INFLATEQ, &[Desc::readable(LIST + 0x2000, 11)]);
    // The list itself outside guest memory, or straddling its end.
    let h4 = drv.add_chain(INFLATEQ, &[Desc::readable(MEM as u64, 64)]);
    let h5 = drv.add_chain(INFLATEQ, &[Desc::readable(MEM as u64 - 4, 8)]);
    drv.kick(INFLATEQ);
    for head in [h1, h2, h3, h4, h5] {
        assert_eq!(drv.used(INFLATEQ), (head, 0));
    }
    let res = resident(&drv, u64::from(target) * PAGE, 5 * PAGE);
    assert_eq!(res, [false, true, false, false, true]);
    assert_eq!(h.state().inflated_pages, 3);
    // The last page of RAM is intact.
    assert_eq!(bytes(&drv, MEM as u64 - 16, 16), vec![0xab; 16]);
}

#[test]
fn a_page_list_is_taken_up_to_its_limit() {
    let (b, mut drv) = started_all();
    let h = b.handle();
    // Twice the limit, all inside RAM: only the first half counts.
    let base = ((16 << 20) / PAGE) as u32;
    let pfns: Vec<u32> = (0..2 * MAX_PAGES_PER_LIST as u32)
        .map(|i| base + i)
        .collect();
    let l = page_list(&drv, LIST, &pfns);
    let head = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
    drv.kick(INFLATEQ);
    assert_eq!(drv.used(INFLATEQ), (head, 0));
    assert_eq!(h.state().inflated_pages, MAX_PAGES_PER_LIST as u64);
    let limit = u64::from(base) * PAGE + MAX_PAGES_PER_LIST as u64 * PAGE;
    assert!(!resident(&drv, limit - PAGE, PAGE)[0]);
    assert!(resident(&drv, limit, PAGE)[0]);
}

#[test]
fn discard_refuses_holes_region_crossings_and_misalignment() {
    // Two adjacent regions and one after a hole.
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 20), 1 << 20),
        (GuestAddress(4 << 20), 1 << 20),
    ])
    .unwrap();
    use DiscardError::*;
    assert_eq!(discard(&mem, 0, 1 << 20), Ok(()));
    assert_eq!(discard(&mem, (1 << 20) - PAGE, 2 * PAGE), Err(OutsideRam));
    assert_eq!(discard(&mem, 2 << 20, PAGE), Err(OutsideRam));
    assert_eq!(discard(&mem, (5 << 20) - PAGE, 2 * PAGE), Err(OutsideRam));
    assert_eq!(discard(&mem, u64::MAX - PAGE + 1, PAGE), Err(OutsideRam));
    assert_eq!(discard(&mem, 4 << 20, u64::MAX), Err(OutsideRam));
    assert_eq!(discard(&mem, (4 << 20) + 512, PAGE), Err(Unaligned));
    assert_eq!(discard(&mem, 4 << 20, 100), Err(Unaligned));
    assert_eq!(discard(&mem, 4 << 20, 1 << 20), Ok(()));
    assert_eq!(ram_region(&mem, (1 << 20) - PAGE, 2 * PAGE), None);
}

#[test]
fn statistics_are_kept_and_refreshed_on_request() {
    let (b, mut drv) = started_all();
    let h = b.handle();
    let statsq = 2;
    let write_stats = |drv: &TestDriver, at: u64, stats: &[(u16, u64)]| -> u32 {
        let raw: Vec<u8> = stats
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        drv.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        raw.len() as u32
    };
    assert_eq!(h.stats(), None);
    // Asking before there is a buffer does nothing.
    h.request_stats();
    let n = write_stats(
        &drv,
        LIST,
        &[
            (stat_tags::MEMFREE, 1 << 30),
            (stat_tags::MEMTOT, 2 << 30),
            (stat_tags::MAJFLT, 17),
            (99, 5),
        ],
    );
    // Plus 7 stray bytes that are not a whole statistic.
    let head = drv.add_chain(statsq, &[Desc::readable(LIST, n + 7)]);
    drv.kick(statsq);
    wait_for("the first statistics", || h.stats().is_some());
    let s = h.stats().unwrap();
    assert_eq!(s.free_memory, Some(1 << 30));
    assert_eq!(s.total_memory, Some(2 << 30));
    assert_eq!(s.major_faults, Some(17));
    assert_eq!(s.swap_in, None);
    assert_eq!(s.other, vec![(99, 5)]);
    assert_eq!(s.generation, 1);
    // The device holds the buffer...
    assert_eq!(drv.wait_used(statsq, Duration::from_millis(100)), None);
    // ...until the host asks for fresh numbers.
    h.request_stats();
    assert_eq!(drv.used(statsq), (head, 0));
    assert!(drv.interrupt.raised(InterruptKind::Queue(statsq), 1));
    let n = write_stats(&drv, LIST, &[(stat_tags::MEMFREE, 5 << 20)]);
    drv.add_chain(statsq, &[Desc::readable(LIST, n)]);
    drv.kick(statsq);
    wait_for("fresh statistics", || {
        h.stats().is_some_and(|s| s.generation == 2)
    });
    let s = h.stats().unwrap();
    assert_eq!(s.free_memory, Some(5 << 20));
    assert_eq!(s.total_memory, None);
    // A statistics buffer outside guest memory counts as an empty report.
    drv.add_chain(statsq, &[Desc::readable(MEM as u64, 10)]);
    drv.kick(statsq);
    wait_for("the empty report", || {
        h.stats().is_some_and(|s| s.generation == 3)
    });
    assert_eq!(h.stats().unwrap().free_memory, None);
}

#[test]
fn reported_free_ranges_are_discarded_page_by_whole_page() {
    let (b, mut drv) = started_all();
    let h = b.handle();
    let reportq = 3;
    let base = 12u64 << 20;
    let h1 = drv.add_chain(
        reportq,
        &[
            // Whole 2 MiB block.
            Desc::writable(base, 2 << 20),
            // Unaligned both ends: only the 2 inner pages go.
            Desc::writable(base + (4 << 20) + 100, (3 * PAGE) as u32),
            // Empty: nothing to do.
            Desc::writable(base + (6 << 20), 0),
            // Readable: skipped.
            Desc::readable(base + (8 << 20), PAGE as u32),
            // Past the end of RAM, and straddling it.
            Desc::writable(MEM as u64, 1 << 20),
            Desc::writable(MEM as u64 - PAGE, (2 * PAGE) as u32),
        ],
    );
    drv.kick(reportq);
    assert_eq!(drv.used(reportq), (h1, 0));
    assert!(drv.interrupt.raised(InterruptKind::Queue(reportq), 1));
    assert!(resident(&drv, base, 2 << 20).iter().all(|r| !*r));
    let res = resident(&drv, base + (4 << 20), 4 * PAGE);
    assert_eq!(res, [true, false, false, true]);
    assert_eq!(bytes(&drv, base + (4 << 20) + 96, 4), vec![0xab; 4]);
    assert_eq!(
        bytes(&drv, base + (4 << 20) + 3 * PAGE, 100),
        vec![0xab; 100]
    );
    assert!(resident(&drv, base + (8 << 20), PAGE)[0]);
    assert!(resident(&drv, MEM as u64 - PAGE, PAGE)[0]);
    assert_eq!(h.state().reported_bytes, (2 << 20) + 2 * PAGE);
}

#[test]
fn without_stats_the_reporting_queue_is_index_2() {
    let features = features::VERSION_1 | balloon_features::REPORTING;
    let (b, mut drv) = started(BalloonConfig::default(), features, &[0, 1, 2]);
    let h1 = drv.add_chain(2, &[Desc::writable(24 << 20, PAGE as u32)]);
    drv.kick(2);
    assert_eq!(drv.used(2), (h1, 0));
    assert!(!resident(&drv, 24 << 20, PAGE)[0]);
    assert_eq!(b.handle().state().reported_bytes, PAGE);
    // And the statistics request has no buffer to return.
    b.handle().request_stats();
    assert_eq!(drv.wait_used(2, Duration::from_millis(100)), None);
}

#[test]
fn reset_keeps_the_target_and_stops_the_worker() {
    let (mut b, mut drv) = started(
        BalloonConfig::from_options("target=16").unwrap(),
        ALL,
        &[0, 1, 2, 3],
    );
    let h = b.handle();
    b.write_config(4, &(16u32 * 256).to_le_bytes());
    assert_eq!(h.actual_mib(), 16);
    b.reset();
    assert_eq!(h.target_mib(), 16);
    assert_eq!(h.actual_mib(), 0);
    let l = page_list(&drv, LIST, &[((8 << 20) / PAGE) as u32]);
    drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
    drv.kick(INFLATEQ);
    assert_eq!(drv.wait_used(INFLATEQ, Duration::from_millis(100)), None);
    assert!(resident(&drv, 8 << 20, PAGE)[0]);
    // Only the two base queues are required.
    let a = drv.activation_of(features::VERSION_1, &[0]);
    assert!(matches!(
        b.activate(a),
        Err(ActivateError::MissingQueues { need: 2, got: 1 })
    ));
    b.activate(drv.activation_of(features::VERSION_1, &[0, 1]))
        .unwrap();
    let l = page_list(&drv, LIST, &[((8 << 20) / PAGE) as u32]);
    let head = drv.add_chain(INFLATEQ, &[Desc::readable(LIST, l)]);
    drv.kick(INFLATEQ);
    assert_eq!(drv.used(INFLATEQ), (head, 0));
    assert!(!resident(&drv, 8 << 20, PAGE)[0]);
}
