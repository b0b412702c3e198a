//! Hostile guest input: random instruction bytes and register values must
//! never panic the host, whatever they do to the guest.

mod common;

use vireo_emulator::Exit;

use common::Guest;

#[test]
fn random_code_never_panics() {
    let mut guest = Guest::new();
    guest.identity(0x20_0000);
    // Also map a page of "MMIO" so random accesses reach the exit paths.
    guest.map_4k(0x7000_0000, 0xfee0_0000, 0x3);
    let seed: u64 = std::env::var("VIREO_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1234_5678_9abc_def1);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let runs: usize = std::env::var("VIREO_FUZZ_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let mut exits = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..runs {
        let code: Vec<u8> = (0..64).map(|_| next() as u8).collect();
        guest.write(0x10_0000, &code);
        let mut cpu = guest.cpu();
        for r in cpu.state.gpr.iter_mut() {
            *r = match next() % 4 {
                0 => 0x10_0000 + next() % 0x1000,
                1 => 0x7000_0000 + next() % 0x1000,
                2 => next() % 0x20_0000,
                _ => next(),
            };
        }
        cpu.state.gpr[4] = 0x18_0000;
        cpu.state.rip = 0x10_0000;
        for _ in 0..8 {
            let exit = cpu.run(64);
            let name = format!("{exit:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap_or("")
                .to_string();
            *exits.entry(name).or_default() += 1;
            match exit {
                Exit::IoIn { .. } | Exit::MmioRead { .. } => cpu.io_data_mut().fill(0x5a),
                Exit::Shutdown | Exit::InternalError(_) => break,
                _ => {}
            }
        }
    }
    eprintln!("exits over {runs} random programs: {exits:?}");
    assert!(exits.values().sum::<usize>() >= runs);
}
