//! The command line: every verb and flag, with help text and examples.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const ABOUT: &str = "vireo: a virtual machine monitor for Linux KVM";

const LONG_ABOUT: &str = "\
vireo runs virtual machines on Linux KVM: one process per VM, the guest's
serial console on your terminal.

Quick start (builds a guest from Debian's packages, then boots it):
  vireo image build --out guest-kit
  vireo run --image guest-kit";

#[derive(Debug, Parser)]
#[command(name = "vireo", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug). VIREO_LOG=filter overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux guest in this process, its serial console on this terminal.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Build and inspect guest images.
    #[command(subcommand)]
    Image(ImageCommand),
}

const RUN_EXAMPLES: &str = "\
Examples:
  vireo run --image guest-kit
  vireo run --image guest-kit --append 'vireo.run=uname -a'
  vireo run --kernel vmlinuz --initrd initrd.img --cpus 2 --memory 512
  vireo run --kernel vmlinux --cmdline 'console=ttyS0 panic=-1 reboot=k'

The guest's COM1 is this terminal: output to stdout, stdin to the guest
(raw mode on a terminal; press Ctrl-A then x to quit). vireo exits 0 when the
guest powers off or resets, 1 when the VM fails, 2 on bad input.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Hardware-assisted virtualization through /dev/kvm.
    Kvm,
    /// The fastest backend that can run this guest here (today: KVM).
    Auto,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: a 64-bit ELF vmlinux or a bzImage (e.g. /boot/vmlinuz-*).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "image",
        conflicts_with = "image"
    )]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) to load with the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// A guest kit made by `vireo image build`: its kernel, initrd and command line.
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,

    /// Kernel command line [default: "console=ttyS0 panic=-1 reboot=k", or the kit's].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Text appended to the kernel command line (e.g. "vireo.run=uname -a").
    #[arg(long, value_name = "STRING")]
    pub append: Option<String>,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,

    /// Which backend runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest kit: Debian's kernel and a busybox initramfs written by vireo.
    #[command(after_help = IMAGE_BUILD_EXAMPLES)]
    Build(ImageBuildArgs),
}

const IMAGE_BUILD_EXAMPLES: &str = "\
Examples:
  vireo image build                  # into ./guest-kit
  vireo image build --out /var/lib/vireo/kit

Needs apt-get and dpkg-deb and reaches only the Debian package archive
(run `apt-get update` first on a fresh machine). The kit holds vmlinuz,
initrd.img and vireo-kit.conf; boot it with `vireo run --image DIR`.";

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// Directory to write the kit into (created if missing).
    #[arg(long, value_name = "DIR", default_value = "guest-kit")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_needs_a_kernel_or_an_image() {
        assert!(Cli::try_parse_from(["vireo", "run"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--image", "d"]).is_err());
        let c = Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--cpus", "2"]).unwrap();
        match c.command {
            Command::Run(r) => assert_eq!((r.cpus, r.memory, r.accel), (2, 256, Accel::Auto)),
            _ => panic!("not run"),
        }
    }

    #[test]
    fn unknown_flags_and_bad_values_are_errors() {
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--cpus", "-1"]).is_err());
        assert!(Cli::try_parse_from(["vireo", "run", "--kernel", "k", "--accel", "xen"]).is_err());
    }
}
