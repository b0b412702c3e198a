//! `vireo vm edit NAME`: the stopped VM's definition (the fields a PATCH
//! may change) as pretty JSON in `$VISUAL`/`$EDITOR` (else vi); what
//! changed is sent as `PATCH /v1/vms/NAME`. A refused change (4xx) is shown
//! and, on a terminal, the editor re-opens on the edited text.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};
use vireo_api::model::Vm;
use vireo_api::units::MemorySize;
use vireo_api::vm::Accel;

use crate::Failure;

/// The editable fields, in the order `vm show` lists them (the fields of
/// `UpdateVm`).
#[derive(Serialize)]
struct Editable<'a> {
    vcpus: u32,
    memory_mib: MemorySize,
    accel: Accel,
    image: &'a Option<String>,
    kernel: &'a Option<String>,
    initrd: &'a Option<String>,
    cmdline: &'a Option<String>,
    disks: &'a Vec<String>,
    nets: &'a Vec<String>,
    vsock: &'a Option<String>,
    rng: &'a Option<String>,
    balloon: &'a Option<String>,
}

pub fn editable_json(vm: &Vm) -> String {
    let e = Editable {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        accel: vm.accel,
        image: &vm.image,
        kernel: &vm.kernel,
        initrd: &vm.initrd,
        cmdline: &vm.cmdline,
        disks: &vm.disks,
        nets: &vm.nets,
        vsock: &vm.vsock,
        rng: &vm.rng,
        balloon: &vm.balloon,
    };
    let mut s = serde_json::to_string_pretty(&e).unwrap_or_default();
    s.push('\n');
    s
}

/// The fields of `edited` that differ from `original` (a field the user
/// deleted is left as it was). Errors name what is wrong with the text.
pub fn changes(original: &str, edited: &str) -> Result<Map<String, Value>, String> {
    let before: Map<String, Value> =
        serde_json::from_str(original).map_err(|e| format!("the original definition: {e}"))?;
    let after: Value = serde_json::from_str(edited).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(after) = after else {
        return Err("the definition must be a JSON object ({ ... })".into());
    };
    Ok(after
        .into_iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .collect())
}

/// The editor command: $VISUAL, else $EDITOR, else vi.
fn editor() -> String {
    ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "vi".into())
}

/// Run the editor on `file` through the shell (so `EDITOR="code --wait"` works).
fn run_editor(file: &Path) -> Result<(), Failure> {
    let editor = editor();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file)
        .status()
        .map_err(|e| Failure::Vm(format!("cannot run the editor `{editor}`: {e}")))?;
    if !status.success() {
        return Err(Failure::Usage(format!(
            "the editor `{editor}` exited with {status}; nothing was changed"
        )));
    }
    Ok(())
}

/// The temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn create(name: &str, text: &str) -> Result<TempFile, Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let path =
            std::env::temp_dir().join(format!("vireo-edit-{name}-{}.json", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Failure::Vm(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Failure::Vm(format!("writing {}: {e}", path.display())))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Ask on the terminal whether to edit again (default yes).
fn again(problem: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("vireo: {problem}\nEdit again? [Y/n] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return false;
    }
    !matches!(line.trim(), "n" | "N" | "no")
}

/// Edit `vm` until the daemon takes the change (or nothing changed); `send`
/// sends a PATCH body and returns the updated VM.
pub fn edit(
    vm: &Vm,
    mut send: impl FnMut(&[u8]) -> Result<Vm, Failure>,
) -> Result<Option<(Vm, Vec<String>)>, Failure> {
    let original = editable_json(vm);
    let file = TempFile::create(&vm.name, &original)?;
    loop {
        run_editor(&file.0)?;
        let edited = std::fs::read_to_string(&file.0)
            .map_err(|e| Failure::Vm(format!("reading {}: {e}", file.0.display())))?;
        let problem = match changes(&original, &edited) {
            Ok(c) if c.is_empty() => return Ok(None),
            Ok(c) => {
                let fields: Vec<String> = c.keys().cloned().collect();
                let body = serde_json::to_vec(&c).unwrap_or_default();
                match send(&body) {
                    Ok(updated) => return Ok(Some((updated, fields))),
                    Err(Failure::Usage(m)) => m,
                    Err(other) => return Err(other),
                }
            }
            Err(m) => m,
        };
        if !again(&problem) {
            return Err(Failure::Usage(format!(
                "{problem} (VM {} unchanged)",
                vm.name
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_fields_are_sent() {
        let before = r#"{"vcpus": 1, "memory_mib": 32, "initrd": null, "disks": []}"#;
        let after = r#"{"vcpus": 2, "memory_mib": 32, "disks": ["/d"], "extra": 1}"#;
        let c = changes(before, after).unwrap();
        assert_eq!(
            Value::Object(c),
            serde_json::json!({"vcpus": 2, "disks": ["/d"], "extra": 1})
        );
        assert!(changes(before, before).unwrap().is_empty());
        assert!(changes(before, "{").unwrap_err().contains("not valid JSON"));
        assert!(changes(before, "[]").unwrap_err().contains("JSON object"));
    }
}
