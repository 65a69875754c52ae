//! The `artguide` command: parses arguments and dispatches; the work is in the library.

use std::io::Write as _;

fn main() {
    let cli = artguide::cli::Cli::parse_args();
    let json = cli.json;
    artguide::memory::tune_allocator();
    artguide::interrupt::install();
    if let Err(e) = artguide::commands::run(cli) {
        if artguide::commands::is_broken_pipe(&e) {
            return;
        }
        let line = artguide::commands::error_line(&e);
        let interrupted = e
            .chain()
            .any(|c| matches!(c.downcast_ref(), Some(artguide::Error::Interrupted)));
        // A script reading --json lines learns how the command ended without parsing stderr.
        if json {
            artguide::commands::print_json_error(&line, interrupted);
        }
        // A closed stderr must not turn a clean failure into a panic.
        let _ = writeln!(std::io::stderr(), "error: {line}");
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
