//! The `artguide` command: parses arguments and dispatches; the work is in the library.

use clap::Parser;

fn main() {
    let cli = artguide::cli::Cli::parse();
    if let Err(e) = artguide::commands::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
