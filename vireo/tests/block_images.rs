//! Disk images end to end: the `vireo image create|info|convert` verbs and
//! the `vireo-block` library against QEMU's own tools. Images vireo writes
//! must pass `qemu-img check` and compare equal to a raw model; images
//! qemu-img and qemu-io write must read correctly in vireo; corrupt images
//! are refused with exit status 2 and a message naming what is wrong.
//!
//! Skipped (with the reason printed) only when qemu-img is not installed
//! (Debian: `apt-get install qemu-utils`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vireo_block::{DiskImage, OpenOptions};
use vireo_testkit::TempDir;

fn tool_available(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn have_qemu_img(test: &str) -> bool {
    if tool_available("qemu-img") {
        return true;
    }
    eprintln!("SKIP {test}: qemu-img is not installed (apt-get install qemu-utils)");
    false
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vireo(args: &[&str], paths: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo"));
    cmd.args(args).args(paths);
    run(&mut cmd)
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    ok(Command::new("qemu-img").args(args).args(paths))
}

/// `qemu-img check` must find nothing at all: no errors, no leaks.
fn assert_qemu_check_clean(image: &Path) -> String {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image));
    let t = text(&out);
    assert!(
        out.status.success(),
        "qemu-img check {}: {t}",
        image.display()
    );
    assert!(t.contains("No errors were found on the image."), "{t}");
    assert!(!t.contains("leaked"), "{t}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_same_as_raw(image: &Path, raw: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(raw));
    assert!(out.status.success(), "qemu-img compare: {}", text(&out));
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// Opens an image this test made, in the format its magic says (the test
/// knows what it made; vireo itself never guesses for a writable disk).
fn open_known(path: &Path, options: OpenOptions<'_>) -> Box<dyn DiskImage> {
    vireo_block::probe(path)
        .and_then(|f| vireo_block::open_as(path, f, options))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn open_rw(path: &Path) -> Box<dyn DiskImage> {
    open_known(path, OpenOptions::writable())
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut img = open_known(path, OpenOptions::read_only());
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap_or_else(|e| panic!("{e}"));
    buf
}

#[test]
fn vireo_images_written_through_the_library_pass_qemu_img_check() {
    if !have_qemu_img("vireo_images_written_through_the_library_pass_qemu_img_check") {
        return;
    }
    let dir = TempDir::new("create");
    for cluster in ["512", "4K", "64K", "2M"] {
        let image = dir.path().join(format!("disk-{cluster}.qcow2"));
        let out = vireo(
            &[
                "image",
                "create",
                "--size",
                "16M",
                "--cluster-size",
                cluster,
            ],
            &[&image],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("16 MiB"));
        assert_qemu_check_clean(&image);

        // Patterns: unaligned, across clusters, overwrites, zeroes, discard.
        let mut model = vec![0u8; 16 << 20];
        let mut rng = Rng(42);
        let mut img = open_rw(&image);
        for i in 0..40u64 {
            let len = 1 + rng.below(200_000) as usize;
            let off = rng.below((16 << 20) - len as u64) as usize;
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            if i % 7 == 3 {
                img.write_zeroes(off as u64, len as u64)
                    .expect("write_zeroes");
                model[off..off + len].fill(0);
            } else {
                img.write_at(&buf, off as u64).expect("write");
                model[off..off + len].copy_from_slice(&buf);
            }
        }
        img.flush().expect("flush");
        drop(img);
        let raw = dir.path().join(format!("model-{cluster}.raw"));
        std::fs::write(&raw, &model).expect("writing the model");
        let report = assert_qemu_check_clean(&image);
        eprintln!("qemu-img check of a vireo image with {cluster} clusters:\n{report}");
        assert_same_as_raw(&image, &raw);
        let info =
            String::from_utf8_lossy(&vireo(&["image", "info"], &[&image]).stdout).into_owned();
        assert!(info.contains("format:       qcow2 (version 3)"), "{info}");
    }
}

#[test]
fn qemu_overlays_and_chains_read_correctly_in_vireo() {
    if !have_qemu_img("qemu_overlays_and_chains_read_correctly_in_vireo") {
        return;
    }
    let dir = TempDir::new("overlay");
    let base = dir.path().join("base.raw");
    let mut model = vec![0u8; 4 << 20];
    Rng(9).fill(&mut model[..3 << 20]);
    std::fs::write(&base, &model).expect("writing base");

    // raw <- qcow2 (mid, written by qemu) <- qcow2 (top, written by qemu).
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(
        &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        &[&mid],
    );
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
        ],
        &[&top],
    );
    let qemu_io = tool_available("qemu-io");
    if qemu_io {
        let io = |img: &Path, cmd: &str| {
            ok(Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(img))
        };
        io(&mid, "write -P 0xaa 100k 300k");
        model[100 << 10..400 << 10].fill(0xaa);
        io(&mid, "write -z 1M 128k");
        model[1 << 20..(1 << 20) + (128 << 10)].fill(0);
        io(&top, "write -P 0x55 390k 20k");
        model[390 << 10..410 << 10].fill(0x55);
        io(&top, "write -P 0x11 3580k 100k");
        model[3580 << 10..3680 << 10].fill(0x11);
        io(&top, "discard 2M 64k");
        // A discarded range in an overlay may read as zeros or as the
        // backing data; qemu makes it zeros in v3 images.
        model[2 << 20..(2 << 20) + (64 << 10)].fill(0);
    } else {
        eprintln!("note: qemu-io is not installed; the overlays stay empty");
    }
    assert!(
        read_all(&top) == model,
        "vireo reads the chain as qemu wrote it"
    );

    let out = vireo(&["image", "info", "--json"], &[&top]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        json.contains("\"backing_file\": \"mid.qcow2\", \"backing_format\": \"qcow2\""),
        "{json}"
    );
    assert!(
        json.contains("\"file\": ") && json.contains("base.raw\", \"format\": \"raw\""),
        "{json}"
    );

    // vireo writes into qemu's overlay: COW from the chain, then qemu agrees.
    let mut img = open_rw(&top);
    let mut rng = Rng(77);
    for _ in 0..30 {
        let len = 1 + rng.below(20_000) as usize;
        let off = rng.below((4 << 20) - len as u64) as usize;
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        img.write_at(&buf, off as u64).expect("write");
        model[off..off + len].copy_from_slice(&buf);
    }
    img.flush().expect("flush");
    drop(img);
    assert_qemu_check_clean(&top);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).expect("writing the model");
    assert_same_as_raw(&top, &raw);
    assert_eq!(std::fs::read(&base).expect("base"), {
        let mut b = vec![0u8; 4 << 20];
        Rng(9).fill(&mut b[..3 << 20]);
        b
    });

    // An overlay made by vireo over qemu's chain.
    let ours = dir.path().join("ours.qcow2");
    let out = vireo(&["image", "create", "--backing", "top.qcow2"], &[&ours]);
    assert!(out.status.success(), "{}", text(&out));
    assert_qemu_check_clean(&ours);
    let info = qemu_img(&["info", "--backing-chain"], &[&ours]);
    assert!(
        info.contains("backing file: top.qcow2") && info.contains("backing file format: qcow2"),
        "{info}"
    );
    assert_same_as_raw(&ours, &raw);
}

#[test]
fn convert_round_trips_are_byte_identical() {
    if !have_qemu_img("convert_round_trips_are_byte_identical") {
        return;
    }
    let dir = TempDir::new("convert");
    let src = dir.path().join("src.raw");
    // Data with holes, and a size that is not a multiple of the chunk.
    let mut data = vec![0u8; (5 << 20) + 4096];
    let mut rng = Rng(5);
    for i in 0..data.len() / 65536 {
        if i % 3 != 0 {
            rng.fill(&mut data[i * 65536..i * 65536 + 30000]);
        }
    }
    std::fs::write(&src, &data).expect("writing the source");
    let q = dir.path().join("a.qcow2");
    let out = vireo(
        &[
            "image",
            "convert",
            "--format",
            "qcow2",
            "--cluster-size",
            "4K",
        ],
        &[&src, &q],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_qemu_check_clean(&q);
    assert_same_as_raw(&q, &src);
    let back = dir.path().join("back.raw");
    let out = vireo(&["image", "convert", "--format", "raw"], &[&q, &back]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&back).expect("reading back") == data,
        "raw -> qcow2 -> raw is identical"
    );

    // Compressed clusters written by qemu-img convert -c read correctly.
    let c = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2"], &[&src, &c]);
    let back2 = dir.path().join("back2.raw");
    let out = vireo(&["image", "convert", "--format", "raw"], &[&c, &back2]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read(&back2).expect("reading back") == data,
        "compressed -> raw is identical"
    );

    // Writing into compressed clusters: decompressed into new clusters.
    let mut img = open_rw(&c);
    img.write_at(&[0xcd; 5000], 70_000).expect("write");
    img.flush().expect("flush");
    drop(img);
    data[70_000..75_000].fill(0xcd);
    assert_qemu_check_clean(&c);
    let model = dir.path().join("model.raw");
    std::fs::write(&model, &data).expect("writing the model");
    assert_same_as_raw(&c, &model);

    // An existing destination is refused.
    let out = vireo(&["image", "convert", "--format", "raw"], &[&q, &back]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("already exists"));
}

#[test]
fn images_in_other_qemu_layouts_are_written_correctly() {
    if !have_qemu_img("images_in_other_qemu_layouts_are_written_correctly") {
        return;
    }
    let dir = TempDir::new("layouts");
    let opts = [
        "compat=0.10",
        "refcount_bits=1,cluster_size=512",
        "refcount_bits=64,cluster_size=4096",
        "refcount_bits=8,lazy_refcounts=off,cluster_size=1024",
        "preallocation=metadata,cluster_size=4096",
    ];
    for (i, o) in opts.iter().enumerate() {
        let image = dir.path().join(format!("l{i}.qcow2"));
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-o", o],
            &[&image, Path::new("3M")],
        );
        let mut img = open_rw(&image);
        let mut model = vec![0u8; 3 << 20];
        let mut rng = Rng(i as u64 + 1);
        for _ in 0..25 {
            let len = 1 + rng.below(100_000) as usize;
            let off = rng.below((3 << 20) - len as u64) as usize;
            rng.fill(&mut model[off..off + len]);
            img.write_at(&model[off..off + len], off as u64)
                .expect("write");
        }
        img.write_zeroes(8192, 100_000).expect("write_zeroes");
        model[8192..108_192].fill(0);
        img.flush().expect("flush");
        drop(img);
        assert_qemu_check_clean(&image);
        let raw = dir.path().join(format!("l{i}.raw"));
        std::fs::write(&raw, &model).expect("writing the model");
        assert_same_as_raw(&image, &raw);
        assert!(
            read_all(&image) == model,
            "{o}: vireo reads back what it wrote"
        );
    }
}

#[test]
fn random_io_against_a_model_passes_qemu_img_check() {
    if !have_qemu_img("random_io_against_a_model_passes_qemu_img_check") {
        return;
    }
    let dir = TempDir::new("random");
    let base = dir.path().join("base.qcow2");
    let size: u64 = 6 << 20;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0xdecaf);
    rng.fill(&mut model[..2 << 20]);
    let base_raw = dir.path().join("base.raw");
    std::fs::write(&base_raw, &model).expect("writing the base");
    qemu_img(
        &["convert", "-q", "-f", "raw", "-O", "qcow2"],
        &[&base_raw, &base],
    );
    let image = dir.path().join("top.qcow2");
    let out = vireo(
        &[
            "image",
            "create",
            "--size",
            "6M",
            "--cluster-size",
            "512",
            "--backing",
            "base.qcow2",
        ],
        &[&image],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut img = open_rw(&image);
    for round in 0..1500 {
        let max = if rng.below(8) == 0 { 70_000 } else { 3000 };
        let len = 1 + rng.below(max);
        let off = rng.below(size - len + 1);
        let (o, l) = (off as usize, len as usize);
        match rng.below(8) {
            0..=3 => {
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                img.write_at(&buf, off).expect("write");
                model[o..o + l].copy_from_slice(&buf);
            }
            4 => {
                img.write_zeroes(off, len).expect("write_zeroes");
                model[o..o + l].fill(0);
            }
            5 if round % 100 == 5 => {
                img.flush().expect("flush");
                drop(img);
                img = open_rw(&image);
            }
            _ => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off).expect("read");
                assert!(
                    buf[..] == model[o..o + l],
                    "round {round}: {len} bytes at {off}"
                );
            }
        }
    }
    img.flush().expect("flush");
    drop(img);
    let report = assert_qemu_check_clean(&image);
    eprintln!("qemu-img check after 1500 random operations:\n{report}");
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).expect("writing the model");
    assert_same_as_raw(&image, &raw);
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening for corruption");
    f.write_all_at(bytes, offset).expect("corrupting");
}

fn read_u64(path: &Path, offset: u64) -> u64 {
    let b = std::fs::read(path).expect("reading");
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[offset as usize..offset as usize + 8]);
    u64::from_be_bytes(a)
}

#[test]
fn corrupt_images_are_refused_with_exit_2() {
    if !have_qemu_img("corrupt_images_are_refused_with_exit_2") {
        return;
    }
    let dir = TempDir::new("corrupt");
    let make = |name: &str| -> PathBuf {
        let p = dir.path().join(name);
        qemu_img(
            &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"],
            &[&p, Path::new("1M")],
        );
        ok(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x33 0 8k"])
            .arg(&p));
        p
    };
    if !tool_available("qemu-io") {
        eprintln!("SKIP corrupt_images_are_refused_with_exit_2: qemu-io is not installed");
        return;
    }
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();

    let p = make("bits.qcow2");
    write_at(&p, 20, &30u32.to_be_bytes());
    cases.push((p, "cluster_bits is 30"));

    let p = make("l1.qcow2");
    let l1 = read_u64(&p, 40);
    write_at(&p, l1, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    cases.push((p, "L1 entry 0"));

    let p = make("l2.qcow2");
    let l1 = read_u64(&p, 40);
    let l2 = read_u64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    write_at(&p, l2, &(0x1234_5600u64 | (1 << 63)).to_be_bytes());
    cases.push((p, "entry 0 (0x8000000012345600) of the L2 table"));

    let p = make("truncated.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open");
    f.set_len(10_000).expect("truncate");
    cases.push((p, "past the end"));

    let p = make("crypt.qcow2");
    write_at(&p, 32, &1u32.to_be_bytes());
    cases.push((p, "encryption (crypt_method 1 = AES) is not supported"));

    for (p, want) in &cases {
        for verb in [
            &["image", "info"][..],
            &["image", "convert", "--format", "raw"][..],
        ] {
            let out_raw = dir.path().join("out.raw");
            let mut paths: Vec<&Path> = vec![p];
            if verb.len() > 2 {
                paths.push(&out_raw);
            }
            let out = vireo(verb, &paths);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "{verb:?} {}: {t}", p.display());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(want), "{verb:?} {}: {stderr}", p.display());
            assert!(stderr.starts_with("vireo: error: "), "{stderr}");
            assert!(
                stderr.contains(&p.display().to_string()),
                "the message names the file: {stderr}"
            );
            assert!(!out_raw.exists(), "a failed convert leaves no output");
        }
    }

    // Dirty images: read-only is fine, writing is refused with the fix.
    let p = make("dirty.qcow2");
    write_at(&p, 72, &1u64.to_be_bytes());
    let out = vireo(&["image", "info"], &[&p]);
    assert!(out.status.success(), "{}", text(&out));
    let err = match vireo_block::open_as(
        &p,
        vireo_api::devices::block::Format::Qcow2,
        OpenOptions::writable(),
    ) {
        Ok(_) => panic!("a dirty image opens writable"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("\"dirty bit\"") && err.contains("qemu-img check -r all"),
        "{err}"
    );
}

#[test]
fn create_errors_and_help() {
    let dir = TempDir::new("errors");
    let image = dir.path().join("a.qcow2");
    let out = vireo(&["image", "create", "--size", "1M"], &[&image]);
    assert!(out.status.success(), "{}", text(&out));
    let cases: Vec<(Vec<&str>, PathBuf, &str)> = vec![
        (
            vec!["image", "create", "--size", "1M"],
            image.clone(),
            "already exists",
        ),
        (
            vec!["image", "create", "--size", "ten"],
            dir.path().join("b"),
            "is not a size",
        ),
        (
            vec!["image", "create", "--size", "1M", "--cluster-size", "3K"],
            dir.path().join("c"),
            "not a power of two",
        ),
        (
            vec!["image", "create", "--backing", "missing.raw"],
            dir.path().join("d"),
            "missing.raw",
        ),
        (
            vec!["image", "create", "--format", "raw", "--backing", "a.qcow2"],
            dir.path().join("e"),
            "--backing needs --format qcow2",
        ),
        (
            vec!["image", "info"],
            dir.path().join("nothing"),
            "nothing: opening failed",
        ),
        (
            vec!["image", "convert", "--format", "raw", "/nonexistent"],
            dir.path().join("f"),
            "/nonexistent",
        ),
    ];
    for (args, path, want) in cases {
        let out = vireo(&args, &[&path]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out)
        );
    }
    for verb in ["create", "info", "convert"] {
        let out = vireo(&["image", verb, "--help"], &[]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Examples:") && help.contains(&format!("vireo image {verb} ")),
            "{help}"
        );
    }
    // A raw image is a sparse file of the size asked for.
    let raw = dir.path().join("r.raw");
    let out = vireo(
        &["image", "create", "--format", "raw", "--size", "3G"],
        &[&raw],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(&raw).expect("raw").len(), 3 << 30);
}

#[test]
fn refcount_table_growth_passes_qemu_img_check() {
    if !have_qemu_img("refcount_table_growth_passes_qemu_img_check") {
        return;
    }
    // 512-byte clusters: one refcount table cluster covers 8 MiB of file,
    // so writing 12 MiB moves the table to bigger, new clusters.
    let dir = TempDir::new("growth");
    let image = dir.path().join("g.qcow2");
    let out = vireo(
        &["image", "create", "--size", "12M", "--cluster-size", "512"],
        &[&image],
    );
    assert!(out.status.success(), "{}", text(&out));
    let table_before = read_u64(&image, 48);
    let mut data = vec![0u8; 12 << 20];
    Rng(3).fill(&mut data);
    let mut img = open_rw(&image);
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        img.write_at(chunk, (i as u64) << 20).expect("write");
    }
    img.flush().expect("flush");
    drop(img);
    assert_ne!(
        read_u64(&image, 48),
        table_before,
        "the refcount table moved"
    );
    let report = assert_qemu_check_clean(&image);
    eprintln!("qemu-img check after the refcount table grew:\n{report}");
    let raw = dir.path().join("g.raw");
    std::fs::write(&raw, &data).expect("writing the model");
    assert_same_as_raw(&image, &raw);
}
