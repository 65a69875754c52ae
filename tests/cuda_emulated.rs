//! artguide's CUDA kernels (src/kernels/cuda.cu) on the CPU. They run only on a GPU, compiled
//! by NVRTC at run time, so without one their index math and block reductions would go
//! unchecked. tests/cuda_emulated/driver.cpp compiles the same source as C++20 against a small
//! emulation of CUDA (tests/cuda_emulated/emulation.h: one OS thread per CUDA thread,
//! `std::barrier` for `__syncthreads`), launches every kernel with src/kernels/cuda.rs's launch
//! shapes (and with one block per row, so each block's threads loop over a whole row) in f32,
//! f16 and bf16, and compares each with a loop in double over the same inputs.
//!
//! Needs a C++ compiler with C++20's `<barrier>` and `_Float16` (`$CXX`, else `c++`, else
//! `g++`); without one, or with `ARTGUIDE_NO_CXX=1`, the test says so on stderr and passes.

use std::fs::File;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The driver runs in ~5 s on two cores; a kernel whose threads wait at different barriers
/// would hang it rather than fail.
const DRIVER_LIMIT: Duration = Duration::from_secs(300);

/// What the driver needs of the compiler beyond C++20 itself.
const PROBE: &str = "#include <barrier>\n\
                     int main() {\n\
                     std::barrier<> b(1);\n\
                     b.arrive_and_wait();\n\
                     _Float16 h = 1.5f;\n\
                     return static_cast<float>(h) == 1.5f ? 0 : 1;\n\
                     }\n";

/// `$CXX` when set, else the first of `c++` and `g++` that runs.
fn compiler() -> Result<String, String> {
    let candidates = match std::env::var("CXX") {
        Ok(cxx) if !cxx.is_empty() => vec![cxx],
        _ => vec!["c++".to_string(), "g++".to_string()],
    };
    candidates
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .cloned()
        .ok_or_else(|| format!("no C++ compiler runs (tried {})", candidates.join(", ")))
}

fn compile(cxx: &str, source: &Path, exe: &Path, extra: &[&str]) -> Output {
    Command::new(cxx)
        .args(["-std=c++20", "-O2", "-pthread"])
        .args(extra)
        .arg("-o")
        .arg(exe)
        .arg(source)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"))
}

/// Runs `exe` with its stdout in `log`, killing it past [`DRIVER_LIMIT`].
fn run_with_limit(exe: &Path, log: &Path) -> (Option<ExitStatus>, String) {
    let mut child = Command::new(exe)
        .stdout(File::create(log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > DRIVER_LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(log).unwrap())
}

#[test]
fn cuda_kernels_match_double_loops_in_a_cpu_emulation() {
    if std::env::var_os("ARTGUIDE_NO_CXX").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED cuda_emulated: ARTGUIDE_NO_CXX=1");
        return;
    }
    let cxx = match compiler() {
        Ok(cxx) => cxx,
        Err(why) => {
            eprintln!("SKIPPED cuda_emulated: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.cpp");
    std::fs::write(&probe, PROBE).unwrap();
    let out = compile(&cxx, &probe, &dir.path().join("probe"), &[]);
    if !out.status.success() {
        eprintln!(
            "SKIPPED cuda_emulated: {cxx} cannot compile C++20 with <barrier> and _Float16:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }

    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulated/driver.cpp");
    let exe = dir.path().join("driver");
    let out = compile(&cxx, &driver, &exe, &["-Wall", "-Wextra"]);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cxx} could not compile {}:\n{warnings}",
        driver.display()
    );
    if !warnings.is_empty() {
        eprintln!("{cxx} warnings on the kernels or the driver:\n{warnings}");
    }

    let (status, log) = run_with_limit(&exe, &dir.path().join("driver.log"));
    print!("{log}");
    // The whole log is printed above; the message keeps the failures and the summary.
    let failures: Vec<&str> = log.lines().filter(|l| !l.starts_with("ok ")).collect();
    let failures = failures.join("\n");
    match status {
        Some(status) => assert!(
            status.success(),
            "emulated CUDA kernels: the driver exited with {status} (its output is above):\n\
             {failures}"
        ),
        None => panic!(
            "emulated CUDA kernels: the driver ran past {DRIVER_LIMIT:?} (a barrier not every \
             thread reaches?; its output is above):\n{failures}"
        ),
    }
}
