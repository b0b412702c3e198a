//! `GET /metrics`: the API request counters and the Prometheus text
//! rendering of a stats sample.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use vireo_api::control::{DiskStats, NetStats};
use vireo_api::model::VmState;

use super::stats::{StatsList, VmStats};

/// API requests answered, by method and response status.
#[derive(Default)]
pub struct RequestCounters(Mutex<BTreeMap<(String, u16), u64>>);

impl RequestCounters {
    /// Count one API request (method and response status).
    pub fn count(&self, method: &str, status: u16) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((method.to_string(), status)).or_insert(0) += 1;
    }

    /// The counters by method and status.
    pub fn by_method_and_status(&self) -> Vec<(String, u16, u64)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|((m, s), n)| (m.clone(), *s, *n)).collect()
    }
}

/// A label value in the Prometheus text format: backslash, double quote and
/// newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A family of samples: `# HELP`, `# TYPE`, then one line per sample.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

/// A float as Prometheus writes it (integers without a fraction).
fn float(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "NaN".into()
    }
}

/// `GET /metrics`: the Prometheus text format 0.0.4.
pub fn render_prometheus(stats: &StatsList, requests: &[(String, u16, u64)]) -> String {
    let mut out = String::new();
    let vms = &stats.vms;
    {
        let mut f = family(&mut out, "vireo_vms", "gauge", "VMs defined, by state.");
        for state in [
            VmState::Running,
            VmState::Paused,
            VmState::Stopped,
            VmState::Crashed,
        ] {
            let n = vms.iter().filter(|v| v.state == state).count();
            f.sample("vireo_vms", &[("state", state.as_str())], n);
        }
    }
    {
        let mut f = family(
            &mut out,
            "vireo_api_requests_total",
            "counter",
            "API requests answered, by method and status code.",
        );
        for (method, code, n) in requests {
            f.sample(
                "vireo_api_requests_total",
                &[("method", method), ("code", &code.to_string())],
                n,
            );
        }
    }
    {
        let mut f = family(
            &mut out,
            "vireo_vm_up",
            "gauge",
            "1 while the VM's process runs (running or paused), else 0.",
        );
        for v in vms {
            f.sample(
                "vireo_vm_up",
                &[("vm", &v.name)],
                u8::from(v.state.is_active()),
            );
        }
    }
    type Get = fn(&VmStats) -> Option<String>;
    let per_vm: [(&str, &str, &str, Get); 4] = [
        (
            "vireo_vm_cpu_seconds_total",
            "counter",
            "CPU time of the VM's process (vCPUs and devices), user plus system.",
            |v| Some(float(v.cpu_seconds)),
        ),
        (
            "vireo_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of the VM's process.",
            |v| Some(v.memory_rss_bytes.to_string()),
        ),
        (
            "vireo_vm_memory_bytes",
            "gauge",
            "Guest memory configured.",
            |v| Some(v.memory_bytes.to_string()),
        ),
        (
            "vireo_vm_exits_total",
            "counter",
            "vCPU exits to the VMM, all vCPUs together.",
            |v| v.exits.map(|n| n.to_string()),
        ),
    ];
    for (name, kind, help, get) in per_vm {
        let mut f = family(&mut out, name, kind, help);
        for v in vms {
            if let Some(value) = get(v) {
                f.sample(name, &[("vm", &v.name)], value);
            }
        }
    }
    type DiskGet = fn(&DiskStats) -> u64;
    for (name, help, get) in [
        (
            "vireo_vm_disk_read_bytes_total",
            "Bytes the guest read from the disk.",
            (|d| d.read_bytes) as DiskGet,
        ),
        (
            "vireo_vm_disk_write_bytes_total",
            "Bytes the guest wrote to the disk.",
            |d| d.write_bytes,
        ),
        (
            "vireo_vm_disk_read_ops_total",
            "Read requests the guest made.",
            |d| d.read_ops,
        ),
        (
            "vireo_vm_disk_write_ops_total",
            "Write requests the guest made.",
            |d| d.write_ops,
        ),
    ] {
        let mut f = family(&mut out, name, "counter", help);
        for v in vms {
            for d in &v.disks {
                f.sample(name, &[("vm", &v.name), ("disk", &d.id)], get(d));
            }
        }
    }
    type NetGet = fn(&NetStats) -> u64;
    for (name, help, get) in [
        (
            "vireo_vm_net_rx_bytes_total",
            "Frame bytes the guest received.",
            (|n| n.rx_bytes) as NetGet,
        ),
        (
            "vireo_vm_net_tx_bytes_total",
            "Frame bytes the guest sent.",
            |n| n.tx_bytes,
        ),
        (
            "vireo_vm_net_rx_packets_total",
            "Frames the guest received.",
            |n| n.rx_packets,
        ),
        (
            "vireo_vm_net_tx_packets_total",
            "Frames the guest sent.",
            |n| n.tx_packets,
        ),
    ] {
        let mut f = family(&mut out, name, "counter", help);
        for v in vms {
            for n in &v.nets {
                f.sample(name, &[("vm", &v.name), ("net", &n.id)], get(n));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use vireo_api::control::DeviceStats;
    use vireo_api::units::MemorySize;

    use super::*;
    use crate::procfs::ProcessStats;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("plain"), "plain");
    }

    /// Every line is a comment or `name{labels} value` with a float value.
    pub fn check_exposition(text: &str) {
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok() || value == "NaN", "{line}");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "{line}");
            }
        }
    }

    #[test]
    fn prometheus_text_renders_every_family() {
        let dev = DeviceStats {
            vcpus: vec![vireo_api::control::VcpuStats { exits: 9 }],
            disks: vec![DiskStats {
                id: "we\"ird\\disk".into(),
                read_bytes: 1,
                write_bytes: 2,
                read_ops: 3,
                write_ops: 4,
            }],
            nets: vec![NetStats {
                id: "net0".into(),
                rx_bytes: 5,
                tx_bytes: 6,
                rx_packets: 7,
                tx_packets: 8,
            }],
        };
        let stats = StatsList {
            time: 1.5,
            vms: vec![
                VmStats::new(
                    "web",
                    VmState::Running,
                    Some(10),
                    MemorySize::mib_const(32),
                    Some(ProcessStats {
                        cpu_seconds: 1.25,
                        rss_bytes: 4096,
                    }),
                    Some(dev),
                ),
                VmStats::new(
                    "db",
                    VmState::Stopped,
                    None,
                    MemorySize::mib_const(64),
                    None,
                    None,
                ),
            ],
        };
        let text = render_prometheus(&stats, &[("GET".into(), 200, 3)]);
        check_exposition(&text);
        for needle in [
            "vireo_vms{state=\"running\"} 1\n",
            "vireo_vms{state=\"stopped\"} 1\n",
            "vireo_api_requests_total{method=\"GET\",code=\"200\"} 3\n",
            "vireo_vm_up{vm=\"web\"} 1\n",
            "vireo_vm_up{vm=\"db\"} 0\n",
            "vireo_vm_cpu_seconds_total{vm=\"web\"} 1.25\n",
            "vireo_vm_memory_rss_bytes{vm=\"web\"} 4096\n",
            "vireo_vm_memory_bytes{vm=\"db\"} 67108864\n",
            "vireo_vm_exits_total{vm=\"web\"} 9\n",
            "vireo_vm_disk_read_bytes_total{vm=\"web\",disk=\"we\\\"ird\\\\disk\"} 1\n",
            "vireo_vm_disk_write_bytes_total{vm=\"web\",disk=\"we\\\"ird\\\\disk\"} 2\n",
            "vireo_vm_net_rx_bytes_total{vm=\"web\",net=\"net0\"} 5\n",
            "vireo_vm_net_tx_bytes_total{vm=\"web\",net=\"net0\"} 6\n",
            "# TYPE vireo_vm_cpu_seconds_total counter\n",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        // Each family's HELP and TYPE appear once.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
    }
}
