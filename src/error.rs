//! The library's error type: every user-facing failure names the file, field or value at fault.

use std::path::PathBuf;

/// Errors raised by the artguide library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that is missing, unreadable or malformed.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A field inside a file (config, recipe, suite) with a bad value.
    #[error("{}: field `{field}`: {message}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// A bad value given by the user (command-line option, API argument).
    #[error("invalid {name}: {message}")]
    Value { name: String, message: String },
    /// An I/O failure on a named path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (shape mismatch, device error).
    #[error("{0}")]
    Candle(candle_core::Error),
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
    /// A run folder whose finished items this run may not join (made with other models,
    /// scheduler, device or dtype); nothing was written.
    #[error("{}: {message}", path.display())]
    NotResumable { path: PathBuf, message: String },
    /// Stopped by Ctrl-C at a safe point; nothing partial was written.
    #[error("interrupted (Ctrl-C); nothing partial was written")]
    Interrupted,
}

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A problem with a whole file.
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A problem with one field of a file.
    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Field {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// A bad user-supplied value.
    pub fn value(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Value {
            name: name.into(),
            message: message.into(),
        }
    }

    /// An I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Largest YAML file (recipe, probe suite) read, in bytes: far above any real one, and a
/// bound on what a hostile file can make the parser hold.
pub const MAX_YAML_BYTES: u64 = 4 << 20;

/// Reads a YAML text file, refusing one larger than [`MAX_YAML_BYTES`] before reading it.
pub fn read_yaml_text(path: &std::path::Path) -> Result<String> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_YAML_BYTES {
        return Err(Error::file(
            path,
            format!("is {len} bytes; YAML inputs are limited to {MAX_YAML_BYTES} bytes"),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(strip_backtrace(e))
    }
}

/// candle attaches a backtrace to errors when RUST_BACKTRACE is set; a user error must stay
/// one line, so the backtrace is dropped (the message keeps the file and tensor names).
pub fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        E::Context { inner, context } => E::Msg(format!("{context}: {}", strip_backtrace(*inner))),
        E::WithPath { inner, path } => {
            E::Msg(format!("{}: {}", path.display(), strip_backtrace(*inner)))
        }
        other => other,
    }
}
