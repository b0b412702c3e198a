//! Kernel modules for the guest kit: which virtio modules a kernel package
//! has, their dependencies, and an order to `insmod` them in.
//!
//! Dependencies come from `lib/modules/VER/modules.dep` when the package
//! ships one. Debian's packages do not (depmod writes it at install time),
//! so otherwise they are read from each module's own `.modinfo` section
//! (`depends=a,b`), which is what depmod reads too.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A module the guest kit wants, and the Kconfig symbol that builds it in.
pub struct Wanted {
    pub name: &'static str,
    pub config: &'static str,
}

/// The virtio drivers a vireo guest uses, and the ACPI power button with
/// the event device busybox acpid reads it from (so `vireo vm stop` shuts
/// the kit down). Their dependencies (virtio_ring, net_failover, failover,
/// ...) are added by the dependency resolution.
pub const WANTED: &[Wanted] = &[
    Wanted {
        name: "virtio",
        config: "CONFIG_VIRTIO",
    },
    Wanted {
        name: "virtio_ring",
        config: "CONFIG_VIRTIO",
    },
    Wanted {
        name: "virtio_pci_modern_dev",
        config: "CONFIG_VIRTIO_PCI_LIB",
    },
    Wanted {
        name: "virtio_pci_legacy_dev",
        config: "CONFIG_VIRTIO_PCI_LIB_LEGACY",
    },
    Wanted {
        name: "virtio_pci",
        config: "CONFIG_VIRTIO_PCI",
    },
    Wanted {
        name: "virtio_mmio",
        config: "CONFIG_VIRTIO_MMIO",
    },
    Wanted {
        name: "virtio_blk",
        config: "CONFIG_VIRTIO_BLK",
    },
    Wanted {
        name: "virtio_net",
        config: "CONFIG_VIRTIO_NET",
    },
    Wanted {
        name: "virtio_console",
        config: "CONFIG_VIRTIO_CONSOLE",
    },
    Wanted {
        name: "rng_core",
        config: "CONFIG_HW_RANDOM",
    },
    Wanted {
        name: "virtio_rng",
        config: "CONFIG_HW_RANDOM_VIRTIO",
    },
    Wanted {
        name: "vsock",
        config: "CONFIG_VSOCKETS",
    },
    Wanted {
        name: "vmw_vsock_virtio_transport_common",
        config: "CONFIG_VIRTIO_VSOCKETS_COMMON",
    },
    Wanted {
        name: "vmw_vsock_virtio_transport",
        config: "CONFIG_VIRTIO_VSOCKETS",
    },
    Wanted {
        name: "virtio_balloon",
        config: "CONFIG_VIRTIO_BALLOON",
    },
    Wanted {
        name: "button",
        config: "CONFIG_ACPI_BUTTON",
    },
    Wanted {
        name: "evdev",
        config: "CONFIG_INPUT_EVDEV",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("could not read {path}: {source}; the unpacked kernel package is incomplete, run `vireo image build` again")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("modules.dep line {line_no} is malformed ({problem}): {line:?}; the kernel package is damaged, run `apt-get clean` and build again")]
    DepSyntax {
        line_no: usize,
        line: String,
        problem: &'static str,
    },
    #[error("kernel module {module} depends on {dependency}, which the kernel package does not have; the package is incomplete, run `apt-get clean` and build again")]
    MissingDependency { module: String, dependency: String },
    #[error("kernel module {module} is not in the kernel package")]
    UnknownModule { module: String },
    #[error("kernel modules depend on each other in a cycle ({chain}), so there is no load order; the module metadata is corrupt, run `apt-get clean` and build again")]
    Cycle { chain: String },
    #[error("{path} is not a loadable x86-64 kernel module ({problem}); the kernel package is damaged, run `apt-get clean` and build again")]
    NotElf {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("{path} is {format}-compressed, and vireo only unpacks plain or gzip-compressed modules; use a kernel package with uncompressed modules")]
    Compressed { path: PathBuf, format: &'static str },
}

/// A module name from a module file path: the base name without `.ko` (and
/// any compression suffix), with `-` spelled `_` as the kernel does
/// (`virtio-rng.ko` is module `virtio_rng`).
pub fn module_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.gz", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|suffix| base.strip_suffix(suffix))?;
    if stem.is_empty() {
        return None;
    }
    Some(stem.replace('-', "_"))
}

/// One module: where it is (relative to `lib/modules/VER`) and the modules
/// it needs loaded first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub deps: Vec<String>,
}

/// Modules by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DepTable {
    pub modules: BTreeMap<String, Module>,
}

/// Parse depmod's `modules.dep`: `path: dep-path dep-path ...` per line.
pub fn parse_modules_dep(text: &str) -> Result<DepTable, ModulesError> {
    let mut table = DepTable::default();
    for (i, line) in text.lines().enumerate() {
        let syntax = |problem| ModulesError::DepSyntax {
            line_no: i + 1,
            line: line.to_string(),
            problem,
        };
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, deps) = line.split_once(':').ok_or_else(|| syntax("no ':'"))?;
        let path = path.trim();
        let name = module_name(path).ok_or_else(|| syntax("not a .ko path"))?;
        let deps = deps
            .split_whitespace()
            .map(|d| module_name(d).ok_or_else(|| syntax("a dependency is not a .ko path")))
            .collect::<Result<Vec<_>, _>>()?;
        table.modules.insert(
            name,
            Module {
                path: path.to_string(),
                deps,
            },
        );
    }
    Ok(table)
}

/// Every module in `roots` and all they depend on, each after its
/// dependencies. Roots keep their given order where the dependencies allow.
pub fn load_order(table: &DepTable, roots: &[&str]) -> Result<Vec<String>, ModulesError> {
    #[derive(PartialEq)]
    enum State {
        Visiting,
        Done,
    }
    fn visit(
        table: &DepTable,
        name: &str,
        state: &mut BTreeMap<String, State>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        match state.get(name) {
            Some(State::Done) => return Ok(()),
            Some(State::Visiting) => {
                let start = stack.iter().position(|n| n == name).unwrap_or(0);
                let mut chain: Vec<&str> = stack[start..].iter().map(String::as_str).collect();
                chain.push(name);
                return Err(ModulesError::Cycle {
                    chain: chain.join(" -> "),
                });
            }
            None => {}
        }
        let module = table.modules.get(name).ok_or_else(|| match stack.last() {
            Some(parent) => ModulesError::MissingDependency {
                module: parent.clone(),
                dependency: name.to_string(),
            },
            None => ModulesError::UnknownModule {
                module: name.to_string(),
            },
        })?;
        state.insert(name.to_string(), State::Visiting);
        stack.push(name.to_string());
        for dep in &module.deps {
            visit(table, dep, state, stack, order)?;
        }
        stack.pop();
        state.insert(name.to_string(), State::Done);
        order.push(name.to_string());
        Ok(())
    }
    let mut state = BTreeMap::new();
    let mut order = Vec::new();
    for root in roots {
        visit(table, root, &mut state, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// Module names listed in `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| module_name(l.trim())).collect()
}

/// Whether the kernel config has `SYMBOL=y`.
pub fn config_is_builtin(config: &str, symbol: &str) -> bool {
    config.lines().any(|l| l.trim() == format!("{symbol}=y"))
}

/// Read a module file, gunzipping `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModulesError> {
    let io = |source| ModulesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path.to_string_lossy();
    for (suffix, format) in [(".xz", "xz"), (".zst", "zstd")] {
        if name.ends_with(suffix) {
            return Err(ModulesError::Compressed {
                path: path.to_path_buf(),
                format,
            });
        }
    }
    let bytes = fs::read(path).map_err(io)?;
    if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        return Ok(out);
    }
    Ok(bytes)
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn le_u64(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
    .ok()
}

/// The contents of the ELF64 section called `want`, bounds-checked.
fn elf_section<'a>(elf: &'a [u8], want: &str) -> Result<&'a [u8], &'static str> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("no ELF magic");
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not 64-bit little-endian ELF");
    }
    let truncated = "section headers out of bounds";
    let shoff = le_u64(elf, 0x28).ok_or(truncated)?;
    let shentsize = le_u16(elf, 0x3a).ok_or(truncated)? as usize;
    let shnum = le_u16(elf, 0x3c).ok_or(truncated)? as usize;
    let shstrndx = le_u16(elf, 0x3e).ok_or(truncated)? as usize;
    if shentsize < 64 {
        return Err("bad section header size");
    }
    let section = |i: usize| -> Option<(u32, u32, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = le_u32(elf, h)?;
        let kind = le_u32(elf, h.checked_add(4)?)?;
        let off = le_u64(elf, h.checked_add(24)?)?;
        let size = le_u64(elf, h.checked_add(32)?)?;
        // SHT_NOBITS (8) occupies no file bytes.
        let data = if kind == 8 {
            &[][..]
        } else {
            elf.get(off..off.checked_add(size)?)?
        };
        Some((name, kind, data))
    };
    let (_, _, names) = section(shstrndx).ok_or(truncated)?;
    for i in 0..shnum {
        let (name_off, _, data) = section(i).ok_or(truncated)?;
        let name = names.get(name_off as usize..).unwrap_or(&[]);
        let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
        if name == want.as_bytes() {
            return Ok(data);
        }
    }
    Err("no .modinfo section")
}

/// The `depends=` list of a module's `.modinfo` section.
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, &'static str> {
    let modinfo = elf_section(ko, ".modinfo")?;
    let deps = modinfo
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default();
    Ok(deps)
}

/// The modules of one unpacked kernel: `lib/modules/VER` and a name index.
pub struct ModuleTree {
    pub root: PathBuf,
    /// Module name -> path relative to `root`.
    index: BTreeMap<String, String>,
}

impl ModuleTree {
    /// Index the `.ko` files under `root` (a `lib/modules/VER` directory).
    pub fn scan(root: &Path) -> Result<ModuleTree, ModulesError> {
        let mut index = BTreeMap::new();
        let mut todo = vec![root.join("kernel")];
        while let Some(dir) = todo.pop() {
            let io = |source| ModulesError::Io {
                path: dir.clone(),
                source,
            };
            for entry in fs::read_dir(&dir).map_err(io)? {
                let entry = entry.map_err(io)?;
                let path = entry.path();
                if entry.file_type().map_err(io)?.is_dir() {
                    todo.push(path);
                } else if let Ok(rel) = path.strip_prefix(root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if let Some(name) = module_name(&rel) {
                        index.insert(name, rel);
                    }
                }
            }
        }
        Ok(ModuleTree {
            root: root.to_path_buf(),
            index,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The dependency table of `roots` and everything they need, read from
    /// `modules.dep` if present, else from each module's `.modinfo`.
    pub fn dep_table(&self, roots: &[&str]) -> Result<DepTable, ModulesError> {
        let dep_file = self.root.join("modules.dep");
        if dep_file.is_file() {
            let text = fs::read_to_string(&dep_file).map_err(|source| ModulesError::Io {
                path: dep_file,
                source,
            })?;
            return parse_modules_dep(&text);
        }
        let mut table = DepTable::default();
        let mut todo: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        while let Some(name) = todo.pop() {
            if table.modules.contains_key(&name) {
                continue;
            }
            // A dependency missing from the index is reported by load_order.
            let Some(rel) = self.index.get(&name) else {
                continue;
            };
            let path = self.root.join(rel);
            let bytes = read_module(&path)?;
            let deps = modinfo_depends(&bytes)
                .map_err(|problem| ModulesError::NotElf { path, problem })?;
            todo.extend(deps.iter().cloned());
            table.modules.insert(
                name,
                Module {
                    path: rel.clone(),
                    deps,
                },
            );
        }
        Ok(table)
    }
}

/// What the kit will carry: the modules in load order (name, file), and the
/// wanted ones that need nothing (built in) or cannot be had.
#[derive(Debug, Default)]
pub struct ModulePlan {
    pub order: Vec<(String, PathBuf)>,
    pub builtin: Vec<String>,
    pub unavailable: Vec<String>,
}

/// Decide which of [`WANTED`] to ship for the kernel in `root`
/// (`lib/modules/VER`), with `config` the text of its `boot/config-VER`.
pub fn plan(root: &Path, config: &str) -> Result<ModulePlan, ModulesError> {
    let tree = ModuleTree::scan(root)?;
    let builtin_file = root.join("modules.builtin");
    let builtin = match fs::read_to_string(&builtin_file) {
        Ok(text) => parse_builtin(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(source) => {
            return Err(ModulesError::Io {
                path: builtin_file,
                source,
            })
        }
    };
    let mut result = ModulePlan::default();
    let mut roots = Vec::new();
    for w in WANTED {
        if tree.contains(w.name) {
            roots.push(w.name);
        } else if builtin.contains(w.name) || config_is_builtin(config, w.config) {
            result.builtin.push(w.name.to_string());
        } else {
            result.unavailable.push(w.name.to_string());
        }
    }
    let table = tree.dep_table(&roots)?;
    for name in load_order(&table, &roots)? {
        let rel = table
            .modules
            .get(&name)
            .map(|m| m.path.clone())
            .unwrap_or_default();
        result.order.push((name, root.join(rel)));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko
";

    #[test]
    fn parses_modules_dep() {
        let t = parse_modules_dep(DEP).unwrap();
        assert_eq!(t.modules.len(), 8);
        assert_eq!(t.modules["virtio"].deps, Vec::<String>::new());
        assert_eq!(t.modules["net_failover"].deps, ["failover"]);
        assert_eq!(
            t.modules["virtio_pci"].deps,
            ["virtio_ring", "virtio_pci_modern_dev", "virtio"]
        );
        // '-' becomes '_' and compression suffixes go.
        assert_eq!(
            t.modules["virtio_rng"].path,
            "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
        );
    }

    #[test]
    fn rejects_malformed_modules_dep() {
        let e = parse_modules_dep("kernel/a.ko:\nno colon here\n").unwrap_err();
        assert!(
            matches!(e, ModulesError::DepSyntax { line_no: 2, .. }),
            "{e}"
        );
        let e = parse_modules_dep("kernel/a.txt: kernel/b.ko\n").unwrap_err();
        assert!(
            matches!(e, ModulesError::DepSyntax { line_no: 1, .. }),
            "{e}"
        );
    }

    fn position(order: &[String], name: &str) -> usize {
        order.iter().position(|n| n == name).unwrap()
    }

    #[test]
    fn dependencies_come_first() {
        let t = parse_modules_dep(DEP).unwrap();
        let order = load_order(&t, &["virtio_net", "virtio_pci", "virtio_rng"]).unwrap();
        assert_eq!(order.len(), 8);
        for (name, module) in &t.modules {
            for dep in &module.deps {
                assert!(
                    position(&order, dep) < position(&order, name),
                    "{dep} after {name}: {order:?}"
                );
            }
        }
        // Each module appears once.
        let unique: BTreeSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
    }

    #[test]
    fn cycle_is_an_error() {
        let t = parse_modules_dep("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n").unwrap();
        let e = load_order(&t, &["a"]).unwrap_err();
        match e {
            ModulesError::Cycle { chain } => assert_eq!(chain, "a -> b -> c -> a"),
            other => panic!("expected a cycle, got {other}"),
        }
        let t = parse_modules_dep("a.ko: a.ko\n").unwrap();
        assert!(matches!(
            load_order(&t, &["a"]),
            Err(ModulesError::Cycle { .. })
        ));
    }

    #[test]
    fn missing_dependency_is_an_error() {
        let t = parse_modules_dep("a.ko: gone.ko\n").unwrap();
        match load_order(&t, &["a"]).unwrap_err() {
            ModulesError::MissingDependency { module, dependency } => {
                assert_eq!((module.as_str(), dependency.as_str()), ("a", "gone"))
            }
            other => panic!("expected a missing dependency, got {other}"),
        }
        assert!(matches!(
            load_order(&t, &["nope"]),
            Err(ModulesError::UnknownModule { .. })
        ));
    }

    #[test]
    fn builtin_and_config() {
        let b = parse_builtin("kernel/drivers/char/hw_random/rng-core.ko\nkernel/crypto/rng.ko\n");
        assert!(b.contains("rng_core") && b.contains("rng"));
        let config = "CONFIG_VIRTIO=m\nCONFIG_HW_RANDOM=y\n# CONFIG_FOO is not set\n";
        assert!(config_is_builtin(config, "CONFIG_HW_RANDOM"));
        assert!(!config_is_builtin(config, "CONFIG_VIRTIO"));
        assert!(!config_is_builtin(config, "CONFIG_FOO"));
    }

    /// A minimal ELF64 with a `.modinfo` section, as modpost would emit.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let shoff = elf.len();
        let mut sh = |name: u32, kind: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, modinfo_off, modinfo.len());
        sh(10, 3, strtab_off, shstrtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_modinfo_depends() {
        let ko =
            fake_module(b"license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0");
        assert_eq!(
            modinfo_depends(&ko).unwrap(),
            ["virtio_ring", "virtio", "net_failover"]
        );
        let ko = fake_module(b"license=GPL\0depends=\0name=virtio\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
        // Corrupt or truncated files are errors, never panics.
        assert!(modinfo_depends(b"not an elf").is_err());
        let ko = fake_module(b"depends=a\0");
        for len in 0..ko.len() {
            let _ = modinfo_depends(&ko[..len]);
        }
        let mut bad = ko.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo_depends(&bad).is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/x/virtio-rng.ko").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("virtio.ko.zst").as_deref(), Some("virtio"));
        assert_eq!(module_name("kernel/x/readme.txt"), None);
        assert_eq!(module_name(".ko"), None);
    }

    #[test]
    fn plan_from_a_fake_tree() {
        let root = std::env::temp_dir().join(format!("vireo-modules-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |rel: &str, modinfo: &[u8]| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, fake_module(modinfo)).unwrap();
        };
        write("kernel/drivers/virtio/virtio.ko", b"depends=\0");
        write("kernel/drivers/virtio/virtio_ring.ko", b"depends=\0");
        write(
            "kernel/drivers/net/virtio_net.ko",
            b"depends=virtio_ring,virtio,net_failover\0",
        );
        write("kernel/drivers/net/net_failover.ko", b"depends=failover\0");
        write("kernel/net/core/failover.ko", b"\0");
        fs::write(
            root.join("modules.builtin"),
            "kernel/drivers/char/hw_random/rng-core.ko\n",
        )
        .unwrap();
        let config = "CONFIG_VIRTIO_BLK=y\n";
        let p = plan(&root, config).unwrap();
        let names: Vec<&str> = p.order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        assert!(p.order[4].1.ends_with("kernel/drivers/net/virtio_net.ko"));
        assert!(p.builtin.contains(&"rng_core".to_string()));
        assert!(p.builtin.contains(&"virtio_blk".to_string()));
        assert!(p.unavailable.contains(&"virtio_balloon".to_string()));
        let _ = fs::remove_dir_all(&root);
    }
}
