//! Reading and writing `.npy` matrices.
//!
//! [`read_npy`] accepts format versions 1, 2 and 3, little-endian float16 (`<f2`), float32
//! (`<f4`) and float64 (`<f8`) data in C order, with a 2-D shape (rows x dims), and returns
//! the values as `f32` (float64 values are rounded to the nearest `f32`). It refuses Fortran
//! order, other dtypes and shapes, and files whose size does not match what the header
//! claims, before allocating anything for the data.
//!
//! [`write_npy`] writes a version 1.0 `<f4` file atomically: to a temporary file in the same
//! directory, then renamed over the destination.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::Matrix;
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers longer than this are refused (numpy itself refuses headers over 10,000 bytes by
/// default; this leaves room for long shapes while bounding the allocation).
const MAX_HEADER_LEN: u64 = 1 << 20;

/// The element types [`read_npy`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE half precision, `<f2`.
    F16,
    /// IEEE single precision, `<f4`.
    F32,
    /// IEEE double precision, `<f8`.
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// What the header of a `.npy` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Format version (major, minor).
    pub version: (u8, u8),
    /// Element type.
    pub dtype: Dtype,
    /// Rows and columns.
    pub shape: (usize, usize),
    /// Byte offset of the data from the start of the file.
    pub data_offset: u64,
}

/// Reads a 2-D `.npy` matrix of float16, float32 or float64 values as `f32`.
///
/// Errors name the file: unreadable, not a `.npy` file, an unsupported version, dtype,
/// Fortran order or shape, or a size that does not match the header.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Matrix> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let header = read_header(&mut file, file_len, path)?;
    let (rows, cols) = header.shape;
    let size = header.dtype.size();
    let n = rows
        .checked_mul(cols)
        .filter(|n| n.checked_mul(size).is_some())
        .ok_or_else(|| Error::file(path, format!("shape ({rows}, {cols}) is too large")))?;
    let data_len = (n * size) as u64;
    let available = file_len - header.data_offset;
    if available < data_len {
        return Err(Error::file(
            path,
            format!(
                "truncated: the header claims {rows} x {cols} {} values ({data_len} bytes) \
                 but the file holds only {available} bytes of data",
                dtype_name(header.dtype)
            ),
        ));
    }
    if available > data_len {
        return Err(Error::file(
            path,
            format!(
                "{} unexpected bytes after the {rows} x {cols} {} values the header declares",
                available - data_len,
                dtype_name(header.dtype)
            ),
        ));
    }
    let mut bytes = vec![0u8; data_len as usize];
    file.read_exact(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let data: Vec<f32> = match header.dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f32)
            .collect(),
    };
    Ok(Matrix { rows, cols, data })
}

/// Reads and checks only the header of a `.npy` file.
pub fn read_npy_header(path: impl AsRef<Path>) -> Result<NpyHeader> {
    let path = path.as_ref();
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_header(&mut file, file_len, path)
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        Dtype::F64 => "float64",
    }
}

fn read_header(file: &mut File, file_len: u64, path: &Path) -> Result<NpyHeader> {
    let not_npy = || {
        Error::file(
            path,
            "not a .npy file (missing the \\x93NUMPY magic string)",
        )
    };
    if file_len < 10 {
        return Err(not_npy());
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    if &prefix[..6] != MAGIC {
        return Err(not_npy());
    }
    let version = (prefix[6], prefix[7]);
    let (header_len, prefix_len) = match version.0 {
        1 => {
            let mut b = [0u8; 2];
            file.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
            (u16::from_le_bytes(b) as u64, 10u64)
        }
        2 | 3 => {
            if file_len < 12 {
                return Err(Error::file(path, "truncated .npy header"));
            }
            let mut b = [0u8; 4];
            file.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
            (u32::from_le_bytes(b) as u64, 12u64)
        }
        _ => {
            return Err(Error::file(
                path,
                format!(
                    "unsupported .npy format version {}.{} (1.0, 2.0 and 3.0 are supported)",
                    version.0, version.1
                ),
            ))
        }
    };
    if header_len > MAX_HEADER_LEN {
        return Err(Error::file(
            path,
            format!("implausible .npy header length of {header_len} bytes"),
        ));
    }
    if prefix_len + header_len > file_len {
        return Err(Error::file(
            path,
            format!(
                "truncated: the .npy header claims {header_len} bytes but the file has only {}",
                file_len - prefix_len
            ),
        ));
    }
    let mut raw = vec![0u8; header_len as usize];
    file.read_exact(&mut raw).map_err(|e| Error::io(path, e))?;
    // Versions 1 and 2 are latin-1, version 3 is UTF-8; a valid header is plain ASCII.
    let text: String = if version.0 == 3 {
        String::from_utf8(raw).map_err(|_| Error::file(path, "the .npy header is not UTF-8"))?
    } else {
        raw.iter().map(|&b| b as char).collect()
    };
    let (dtype, shape) = parse_header_dict(&text).map_err(|m| Error::file(path, m))?;
    Ok(NpyHeader {
        version,
        dtype,
        shape,
        data_offset: prefix_len + header_len,
    })
}

/// A value in the header dictionary.
#[derive(Debug)]
enum Lit {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
    Other(String),
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "malformed .npy header: expected `{}` at byte {}",
                c as char, self.i
            ))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = self.peek().ok_or("malformed .npy header: unexpected end")?;
        if q != b'\'' && q != b'"' {
            return Err(format!(
                "malformed .npy header: expected a quoted string at byte {}",
                self.i
            ));
        }
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("malformed .npy header: unterminated string".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }
    fn value(&mut self) -> std::result::Result<Lit, String> {
        match self.peek() {
            Some(b'\'') | Some(b'"') => Ok(Lit::Str(self.string()?)),
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    match self.peek() {
                        Some(b')') => {
                            self.i += 1;
                            break;
                        }
                        Some(c) if c.is_ascii_digit() => {
                            let start = self.i;
                            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                                self.i += 1;
                            }
                            // Python 2 era headers may write `10L`.
                            if self.s.get(self.i) == Some(&b'L') {
                                self.i += 1;
                            }
                            let digits = std::str::from_utf8(&self.s[start..self.i])
                                .unwrap_or("")
                                .trim_end_matches('L');
                            let v = digits.parse::<u64>().map_err(|_| {
                                format!("malformed .npy header: bad dimension `{digits}`")
                            })?;
                            items.push(v);
                            if self.peek() == Some(b',') {
                                self.i += 1;
                            }
                        }
                        _ => {
                            return Err(format!(
                                "malformed .npy header: bad shape tuple at byte {}",
                                self.i
                            ))
                        }
                    }
                }
                Ok(Lit::Tuple(items))
            }
            Some(_) => {
                // A bare word (True/False) or something we do not support (a list for a
                // structured dtype): take everything up to the next top-level comma or brace.
                let start = self.i;
                let mut depth = 0i32;
                while self.i < self.s.len() {
                    match self.s[self.i] {
                        b'[' | b'(' | b'{' => depth += 1,
                        b']' | b')' => depth -= 1,
                        b'}' if depth == 0 => break,
                        b'}' => depth -= 1,
                        b',' if depth == 0 => break,
                        _ => {}
                    }
                    self.i += 1;
                }
                let word = String::from_utf8_lossy(&self.s[start..self.i])
                    .trim()
                    .to_string();
                Ok(match word.as_str() {
                    "True" => Lit::Bool(true),
                    "False" => Lit::Bool(false),
                    _ => Lit::Other(word),
                })
            }
            None => Err("malformed .npy header: unexpected end".into()),
        }
    }
}

/// Parses the header dictionary into a dtype and a 2-D shape.
fn parse_header_dict(text: &str) -> std::result::Result<(Dtype, (usize, usize)), String> {
    let mut c = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    c.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if c.peek() == Some(b'}') {
            c.i += 1;
            break;
        }
        let key = c.string()?;
        c.expect(b':')?;
        let value = c.value()?;
        match key.as_str() {
            "descr" => descr = Some(value),
            "fortran_order" => fortran = Some(value),
            "shape" => shape = Some(value),
            _ => {}
        }
        match c.peek() {
            Some(b',') => c.i += 1,
            Some(b'}') => {}
            _ => {
                return Err(format!(
                    "malformed .npy header: expected `,` or `}}` at byte {}",
                    c.i
                ))
            }
        }
    }
    if !text[c.i..].trim().is_empty() {
        return Err(format!(
            "malformed .npy header: unexpected text after the dictionary at byte {}",
            c.i
        ));
    }
    let dtype = match descr {
        Some(Lit::Str(d)) => match d.as_str() {
            "<f2" => Dtype::F16,
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            ">f2" | ">f4" | ">f8" => {
                return Err(format!(
                    "unsupported dtype `{d}`: big-endian data (save it little-endian, e.g. \
                     with arr.astype('<f4'))"
                ))
            }
            _ => {
                return Err(format!(
                    "unsupported dtype `{d}` (supported: little-endian float16 `<f2`, \
                     float32 `<f4`, float64 `<f8`)"
                ))
            }
        },
        Some(Lit::Other(d)) => {
            return Err(format!(
                "unsupported dtype `{d}` (structured arrays are not supported; supported: \
                 `<f2`, `<f4`, `<f8`)"
            ))
        }
        Some(_) => return Err("malformed .npy header: `descr` is not a string".into()),
        None => return Err("malformed .npy header: no `descr` key".into()),
    };
    match fortran {
        Some(Lit::Bool(false)) => {}
        Some(Lit::Bool(true)) => {
            return Err(
                "Fortran-order arrays are not supported (save a C-order array, e.g. with \
                 np.ascontiguousarray)"
                    .into(),
            )
        }
        Some(_) => return Err("malformed .npy header: `fortran_order` is not True/False".into()),
        None => return Err("malformed .npy header: no `fortran_order` key".into()),
    }
    let shape = match shape {
        Some(Lit::Tuple(dims)) => dims,
        Some(_) => return Err("malformed .npy header: `shape` is not a tuple".into()),
        None => return Err("malformed .npy header: no `shape` key".into()),
    };
    if shape.len() != 2 {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        return Err(format!(
            "expected a 2-D array (rows x dims), found shape ({})",
            dims.join(", ")
        ));
    }
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| format!("dimension {v} is too large"));
    Ok((dtype, (to_usize(shape[0])?, to_usize(shape[1])?)))
}

/// Converts an IEEE half-precision bit pattern to `f32` (exactly).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // Zero or subnormal: mant * 2^-24, exact in f32.
            let v = mant as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// Writes `m` as a version 1.0 little-endian float32 `.npy` file, atomically: the data go to a
/// temporary file in the destination's directory, which is then renamed over `path`.
pub fn write_npy(path: impl AsRef<Path>, m: &Matrix) -> Result<()> {
    let path = path.as_ref();
    if m.data.len() != m.rows * m.cols {
        return Err(Error::file(
            path,
            format!(
                "refusing to write {} values as {} x {}",
                m.data.len(),
                m.rows,
                m.cols
            ),
        ));
    }
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        m.rows, m.cols
    );
    // Pad with spaces so that magic + version + length + header (ending in '\n') is a
    // multiple of 64 bytes, as numpy does.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + m.data.len() * 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in &m.data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that readers see either the old file or the complete new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file name"))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = BufWriter::new(f);
        w.write_all(bytes)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn header_dict() {
        let (d, s) = parse_header_dict(
            "{'descr': '<f2', 'fortran_order': False, 'shape': (1464, 768), }  \n",
        )
        .unwrap();
        assert_eq!((d, s), (Dtype::F16, (1464, 768)));
        let e = parse_header_dict("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }")
            .unwrap_err();
        assert!(e.contains("Fortran"), "{e}");
        let e = parse_header_dict("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }")
            .unwrap_err();
        assert!(e.contains("<i8"), "{e}");
        let e = parse_header_dict("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }")
            .unwrap_err();
        assert!(e.contains("(6)"), "{e}");
        let e = parse_header_dict(
            "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (2, 3), }",
        )
        .unwrap_err();
        assert!(e.contains("structured"), "{e}");
    }

    #[test]
    fn roundtrip_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.npy");
        let m = Matrix::new(2, 3, vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0]).unwrap();
        write_npy(&p, &m).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - 24) % 64, 0, "header padded to 64 bytes");
        assert_eq!(read_npy(&p).unwrap(), m);
        // Overwrite: no temporary files left behind.
        write_npy(&p, &m).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
