//! The guest kit's `/init`: a busybox shell script run as PID 1.
//!
//! It mounts /proc, /sys and /dev, prints a banner, loads the kit's modules,
//! prints `vireo-init: ready`, then runs the command given on the kernel
//! command line as `vireo.run=COMMAND` with `sh -c` (or an interactive shell
//! without one), and powers the machine off when that ends.
//!
//! `vireo.run=` takes everything after it up to the end of the command line,
//! spaces and `;` included, so it must be the last parameter. One pair of
//! surrounding double quotes is removed (`vireo.run="echo hi"`), since the
//! kernel accepts quoted values but leaves the quotes in /proc/cmdline.
//!
//! `vireo.exit=reboot` (placed before `vireo.run=`) makes the guest end
//! with `reboot -f` instead of `poweroff -f`: with `reboot=k` that resets
//! through the keyboard controller (or a triple fault), which a VMM without
//! an ACPI power-off still sees.

/// Where the modules go inside the initramfs.
pub const MODULE_DIR: &str = "lib/modules";

/// Printed right before the command or shell starts.
pub const READY_MARKER: &str = "vireo-init: ready";

/// The busybox applets linked into /bin at build time (the init runs
/// `busybox --install -s` for the rest once /proc is mounted).
pub const APPLETS: &[&str] = &[
    "sh", "ash", "mount", "umount", "insmod", "rmmod", "lsmod", "poweroff", "reboot", "halt",
    "sync", "cat", "echo", "printf", "uname", "mkdir", "sleep", "ls", "cut", "setsid", "cttyhack",
    "dmesg", "mknod", "ps", "grep", "sed", "head", "tail", "ln", "cp", "mv", "rm", "true", "false",
    "test", "[", "env", "ip", "ifconfig", "hostname", "date", "df", "free", "stat", "wc", "tr",
    "awk", "find", "hexdump", "dd", "vi", "id", "kill", "chmod", "mkfifo", "uptime", "readlink",
    "sysctl", "timeout", "time", "nproc", "seq", "acpid",
];

/// The `/init` script for modules loaded in `module_order` (names; the files
/// are `/lib/modules/NAME.ko`).
pub fn script(module_order: &[String]) -> String {
    let modules = module_order.join(" ");
    format!(
        r#"#!/bin/sh
# vireo guest kit init, written by `vireo image build`.
# Kernel command line: vireo.run=COMMAND (last; runs `sh -c COMMAND`),
# vireo.exit=reboot (end with `reboot -f` instead of `poweroff -f`).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=linux
umask 022

mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "vireo-init: could not mount devtmpfs on /dev; only /dev/console and /dev/null exist"
mount -t tmpfs tmpfs /tmp
/bin/busybox --install -s 2>/dev/null

echo "vireo guest kit: Linux $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s"

loaded=0
for m in {modules}; do
    if err=$(insmod /{MODULE_DIR}/$m.ko 2>&1); then
        loaded=$((loaded + 1))
    else
        echo "vireo-init: module $m not loaded: $err"
    fi
done
echo "vireo-init: $loaded modules loaded"

# The ACPI power button (`vireo vm stop`, the control socket's
# `power-button`): busybox acpid reads it from /dev/input/event* and runs
# /etc/acpi/PWRF/00000080, which powers the machine off.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "vireo-init: power button pressed, powering off" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080
if ls /dev/input/event* >/dev/null 2>&1; then
    acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid || echo "vireo-init: acpid did not start; the power button is ignored"
else
    echo "vireo-init: no input event devices (button/evdev not loaded); the power button is ignored"
fi

cmdline=" $(cat /proc/cmdline) "
run=""
has_run=0
case "$cmdline" in
    *" vireo.run="*)
        has_run=1
        run=${{cmdline#*" vireo.run="}}
        run=${{run% }}
        case "$run" in
            \"*\") run=${{run#\"}}; run=${{run%\"}} ;;
        esac
        ;;
esac
before_run=${{cmdline%%" vireo.run="*}}
exit_with=poweroff
case "$before_run " in
    *" vireo.exit=reboot "*) exit_with=reboot ;;
esac

echo "{READY_MARKER}"
if [ "$has_run" = 1 ]; then
    sh -c "$run"
    status=$?
    echo "vireo: command exited with status $status"
else
    # cttyhack gives the shell the real console as its controlling tty, so
    # job control and Ctrl-C work.
    setsid cttyhack sh || sh
fi

sync
if [ "$exit_with" = reboot ]; then
    reboot -f
else
    poweroff -f
fi
# Still here: leaving PID 1 panics the kernel, and panic=-1 reboots at once.
sleep 1
exit 1
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_the_expected_pieces() {
        let s = script(&["virtio".into(), "virtio_ring".into(), "virtio_blk".into()]);
        assert!(s.starts_with("#!/bin/sh\n"));
        for piece in [
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            "mount -t devtmpfs devtmpfs /dev",
            "vireo guest kit: Linux $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s",
            "for m in virtio virtio_ring virtio_blk; do",
            "insmod /lib/modules/$m.ko",
            "cat /proc/cmdline",
            "vireo.run=",
            "echo \"vireo-init: ready\"",
            "sh -c \"$run\"",
            "vireo: command exited with status $status",
            "setsid cttyhack sh",
            "sync",
            "poweroff -f",
        ] {
            assert!(s.contains(piece), "init script lacks {piece:?}:\n{s}");
        }
        // The ready marker comes after module loading and before the command.
        let ready = s.find("echo \"vireo-init: ready\"").unwrap();
        assert!(s.find("insmod").unwrap() < ready);
        let run = s.find("sh -c \"$run\"").unwrap();
        assert!(ready < run && run < s.rfind("poweroff -f").unwrap());
    }

    #[test]
    fn applets_cover_the_script() {
        for applet in [
            "sh", "mount", "insmod", "poweroff", "reboot", "cat", "echo", "uname", "mkdir", "cut",
            "sync", "setsid", "cttyhack", "sleep",
        ] {
            assert!(APPLETS.contains(&applet), "{applet} is not linked");
        }
    }

    /// Run the script's command-line parsing with the host's /bin/sh.
    fn parse_with_host_sh(cmdline: &str) -> Option<(String, String, String)> {
        let s = script(&[]);
        let start = s.find("cmdline=\" $(cat /proc/cmdline) \"")?;
        let end = s.find("echo \"vireo-init: ready\"")?;
        let snippet = s[start..end].replace("$(cat /proc/cmdline)", "$CMDLINE");
        let program =
            format!("{snippet}\nprintf '%s\\n%s\\n[%s]' \"$has_run\" \"$exit_with\" \"$run\"");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(program)
            .env("CMDLINE", cmdline)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut lines = text.splitn(3, '\n');
        Some((
            lines.next()?.into(),
            lines.next()?.into(),
            lines.next()?.into(),
        ))
    }

    #[test]
    fn command_line_parsing() {
        let Some(r) =
            parse_with_host_sh("console=ttyS0 panic=-1 vireo.run=echo hi; ls /lib/modules")
        else {
            eprintln!("no host sh; skipping");
            return;
        };
        assert_eq!(
            r,
            (
                "1".into(),
                "poweroff".into(),
                "[echo hi; ls /lib/modules]".into()
            )
        );
        let r =
            parse_with_host_sh("console=ttyS0 vireo.exit=reboot vireo.run=\"uname -a\"").unwrap();
        assert_eq!(r, ("1".into(), "reboot".into(), "[uname -a]".into()));
        let r = parse_with_host_sh("vireo.run=true").unwrap();
        assert_eq!(r, ("1".into(), "poweroff".into(), "[true]".into()));
        let r = parse_with_host_sh("console=ttyS0 panic=-1").unwrap();
        assert_eq!(r, ("0".into(), "poweroff".into(), "[]".into()));
        // vireo.exit after vireo.run belongs to the command.
        let r = parse_with_host_sh("vireo.run=echo vireo.exit=reboot").unwrap();
        assert_eq!(
            r,
            (
                "1".into(),
                "poweroff".into(),
                "[echo vireo.exit=reboot]".into()
            )
        );
    }
}
