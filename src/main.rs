//! The `artguide` command: parses arguments and dispatches; the work is in the library.

use clap::Parser;

fn main() {
    let cli = artguide::cli::Cli::parse();
    artguide::memory::tune_allocator();
    artguide::interrupt::install();
    if let Err(e) = artguide::commands::run(cli) {
        eprintln!("error: {e:#}");
        let interrupted = e
            .chain()
            .any(|c| matches!(c.downcast_ref(), Some(artguide::Error::Interrupted)));
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
