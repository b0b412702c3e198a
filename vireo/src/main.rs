//! `vireo`: the command-line front end. It parses flags, turns `vireo run`'s
//! into a VM spec for the VMM library (`vireo-vmm`, which builds and runs
//! the machine), drives the terminal and the jail, talks to the daemon, and
//! reports one clear line on failure. VMM logic belongs in `vireo-vmm`.

mod api_client;
mod cli;
mod console;
mod console_client;
mod disk;
mod doctor;
mod gen_docs;
mod jail_run;
mod run_cli;
mod signals;
mod token_cli;
mod ui;
mod vm_cli;
mod vm_edit;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, ImageCommand};

/// How a command failed, which decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad input the user can fix: exit status 2.
    Usage(String),
    /// The VM or the VMM failed: exit status 1.
    Vm(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Vm(m) => f.write_str(m),
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("VIREO_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // SAFETY: isatty only inspects the descriptor.
        .with_ansi(unsafe { libc::isatty(libc::STDERR_FILENO) } == 1)
        .init();
}

fn image_build(args: cli::ImageBuildArgs) -> Result<(), Failure> {
    let opts = vireo_guestkit::BuildOptions { out: args.out };
    let kit = vireo_guestkit::build(&opts, &mut |line| eprintln!("vireo: {line}"))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    println!("guest kit ready in {}", kit.dir.display());
    println!(
        "  kernel  {} (Linux {})",
        kit.kernel.display(),
        kit.kernel_version
    );
    println!("  initrd  {}", kit.initrd.display());
    println!("  cmdline {}", kit.cmdline);
    println!("boot it:  vireo run --image {}", kit.dir.display());
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => run_cli::run(args),
        Command::Image(ImageCommand::Build(args)) => image_build(args),
        Command::Image(ImageCommand::Create(args)) => disk::create(args),
        Command::Image(ImageCommand::Info(args)) => disk::info(args),
        Command::Image(ImageCommand::Convert(args)) => disk::convert(args),
        Command::Serve(args) => vm_cli::serve(args),
        Command::Vm(args) => vm_cli::vm(args),
        Command::Token(args) => token_cli::token(args),
        Command::Ui(args) => ui::ui(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Completions { shell } => gen_docs::completions(shell, &mut std::io::stdout()),
        Command::Manpages { dir } => gen_docs::manpages(&dir).map(|_| ()),
    };
    match result {
        Ok(()) => {}
        Err(Failure::Usage(msg)) => {
            eprintln!("vireo: error: {msg}");
            std::process::exit(2);
        }
        Err(Failure::Vm(msg)) => {
            eprintln!("vireo: error: {msg}");
            std::process::exit(1);
        }
    }
}
