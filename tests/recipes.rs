//! Recipes end to end on the committed tiny models: every shipped smoke recipe runs; shards
//! merge into the unsharded run byte for byte; a run killed part-way resumes to the same bytes
//! with no partial file ever visible; bad recipes give one clear line and write nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_artguide"));
    c.env("HF_HUB_OFFLINE", "1");
    // Caches (model hashes, embeddings) under target/, not the user's home.
    c.env(
        "XDG_CACHE_HOME",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"),
    );
    c
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `artguide MODE run RECIPE --out OUT EXTRA...` with MODE `--quiet` or `--json`.
fn run_in(mode: &str, recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args([mode, "run"])
        .arg(recipe)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn run(recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    run_in("--quiet", recipe, out, extra)
}

/// `artguide --json run RECIPE --out OUT EXTRA...`: progress and events as JSON lines.
fn run_json(recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    run_in("--json", recipe, out, extra)
}

/// The `done` event of a successful `run_json`.
fn done_event(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "done")
        .unwrap_or_else(|| panic!("no done event: {}", String::from_utf8_lossy(&o.stdout)))
}

/// `artguide merge RECIPE --out OUT SHARDS...`.
fn merge(recipe: &Path, out: &Path, shards: &[&Path]) -> Output {
    bin()
        .args(["--quiet", "merge"])
        .arg(recipe)
        .arg("--out")
        .arg(out)
        .args(shards)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts `o` failed (`what` says what it must not have done) with one line of stderr
/// holding each of `needles`, and no advice to resume (which would fail the same way).
fn assert_refused(o: &Output, what: &str, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("to resume"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` is not in: {err}");
    }
}

/// Every non-hidden file under `dir` (relative path -> bytes), sidecars' timings removed.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "a temporary file is left: {rel}");
            if rel.ends_with(".json") && rel.starts_with("images/") {
                // Sidecars hold wall-clock timings: compare everything else.
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                v["timings"] = serde_json::Value::Null;
                out.push((rel, v.to_string().into_bytes()));
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v
}

fn smoke(name: &str) -> PathBuf {
    repo().join("recipes/smoke").join(format!("{name}.yaml"))
}

/// Runs recipe `text` written beside the smoke recipes (so its relative paths resolve), as a
/// hidden file removed afterwards.
fn run_text(name: &str, text: &str, out: &Path, extra: &[&str]) -> Output {
    let path = smoke(&format!(".test-{name}"));
    std::fs::write(&path, text).unwrap();
    let o = run(&path, out, extra);
    let _ = std::fs::remove_file(&path);
    o
}

#[test]
fn every_smoke_recipe_runs_and_records_each_image() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["compare", "style-transfer", "period-shift", "probeset"] {
        let out = tmp.path().join(name);
        let o = if name == "probeset" {
            run_json(&smoke(name), &out, &[])
        } else {
            run(&smoke(name), &out, &[])
        };
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        if name == "probeset" {
            // Progress names the item each step belongs to.
            let labels: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["event"] == "progress")
                .map(|v| v["label"].as_str().unwrap().to_string())
                .collect();
            assert!(!labels.is_empty());
            assert!(labels.iter().all(|l| l.contains(": step ")), "{labels:?}");
        }
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
        let items = r["items"].as_array().unwrap();
        assert!(!items.is_empty());
        for it in items {
            let png = out.join(it["image"].as_str().unwrap());
            let bytes = std::fs::read(&png).unwrap();
            use sha2::Digest;
            assert_eq!(
                format!("{:x}", sha2::Sha256::digest(&bytes)),
                it["sha256"].as_str().unwrap(),
                "{name}: {}",
                png.display()
            );
            let probes = it["probes"].as_object().unwrap();
            assert!(probes.contains_key(r["probe_clip"].as_str().unwrap()));
            if let Some(g) = r["guide_clip"].as_str() {
                assert!(probes.contains_key(g), "{name}: guide CLIP answers missing");
            }
        }
        // Arms of a cell pair: guided arms differ from their baseline.
        if name == "compare" {
            let base = items.iter().find(|i| i["baseline"] == true).unwrap();
            let arm = items
                .iter()
                .find(|i| i["cell"] == base["cell"] && i["baseline"] == false)
                .unwrap();
            assert_ne!(base["sha256"], arm["sha256"]);
            assert_eq!(base["seed"], arm["seed"]);
        }
        // A guided image's sidecar names the style image by content.
        if name == "style-transfer" {
            let it = items.iter().find(|i| i["arm"] == "style-image").unwrap();
            let png = out.join(it["image"].as_str().unwrap());
            let side: serde_json::Value =
                serde_json::from_slice(&std::fs::read(png.with_extension("json")).unwrap())
                    .unwrap();
            let swirls = std::fs::read(repo().join("recipes/assets/swirls.png")).unwrap();
            use sha2::Digest;
            assert_eq!(
                side["params"]["extra"]["guidance"]["files_sha256"]["style.image"],
                format!("{:x}", sha2::Sha256::digest(&swirls)),
                "{side}"
            );
        }
        if name == "probeset" {
            assert_eq!(items.len(), 2 * 4);
            let labels = &items[0]["target"]["labels"];
            assert!(
                labels["style"].is_string() && labels["period"].is_string(),
                "{labels}"
            );
        }
        // A second run finds everything done and changes nothing.
        let before = tree(&out);
        let o = run(&smoke(name), &out, &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_eq!(tree(&out), before, "{name}: a re-run changed the folder");
    }
}

#[test]
fn shards_merge_into_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = smoke("compare");
    let whole = tmp.path().join("whole");
    let o = run(&recipe, &whole, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b, merged) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("m"),
    );
    for (dir, shard) in [(&a, "0/2"), (&b, "1/2")] {
        let o = run(&recipe, dir, &["--shard", shard]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = merge(&recipe, &merged, &[&a, &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (tw, tm) = (tree(&whole), tree(&merged));
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&tw), names(&tm));
    for ((n, x), (_, y)) in tw.iter().zip(&tm) {
        assert!(
            x == y,
            "{n} differs between the merged and the unsharded run"
        );
    }
    // A shard started from the recipe at another path names each local model by another
    // path: it merges all the same, into the unsharded run's results (it was refused as
    // made "with different models", and its answers would have counted as other models').
    let elsewhere = repo().join("recipes/smoke/../smoke/compare.yaml");
    let (c, merged2) = (tmp.path().join("c"), tmp.path().join("m-elsewhere"));
    let o = run(&elsewhere, &c, &["--shard", "1/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(dir.join("manifest.json")).unwrap(),
        )
        .unwrap()["model"]
            .clone()
    };
    assert_ne!(
        model(&c),
        model(&a),
        "the shards spell the model the same way"
    );
    let o = merge(&recipe, &merged2, &[&a, &c]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The PNGs' text records each model's path as run, so only their hashes may differ.
    let results_json = |dir: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
        for it in v["items"].as_array_mut().unwrap() {
            it["sha256"] = serde_json::Value::Null;
        }
        v
    };
    assert!(
        results_json(&merged2) == results_json(&whole),
        "results.json of shards made from two recipe paths differs from the unsharded run's"
    );
    // Merged with the other-path shard first: the answers still take the spelling of the
    // recipe given to merge, which the items' guide ids are in (compare finds the guide).
    let o = merge(&recipe, &tmp.path().join("m4"), &[&c, &a]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        results_json(&tmp.path().join("m4")) == results_json(&whole),
        "merging the other-path shard first changed results.json"
    );
    // A shard made with another SD model is refused, naming the field and both models.
    let original = std::fs::read(c.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let other = repo()
        .join("tests/fixtures/tiny-sd-b")
        .display()
        .to_string();
    m["model"] = other.clone().into();
    std::fs::write(c.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let o = merge(&recipe, &tmp.path().join("m3"), &[&a, &c]);
    assert_refused(
        &o,
        "merged shards of two SD models",
        &["manifest.json", "model", &other],
    );
    // So is one made with other weights behind the same spec (the folder changed between
    // the shards, or differs between machines), or in another dtype.
    let m: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let sd = m["model"].as_str().unwrap().to_string();
    let zeros = "0".repeat(64);
    type Edit = fn(&mut serde_json::Value, &str, &str);
    let edits: [(&str, Edit, &[&str]); 2] = [
        (
            "weights",
            |m, sd, zeros| m["made_with"]["fingerprints"][sd] = zeros.into(),
            &["weights of", "sha256 000000000000"],
        ),
        (
            "dtype",
            |m, _, _| m["made_with"]["dtype"] = "f16".into(),
            &["dtype f16", "other shards with f32"],
        ),
    ];
    for (what, edit, needles) in edits {
        let mut m: serde_json::Value = serde_json::from_slice(&original).unwrap();
        assert!(
            m["made_with"]["fingerprints"][&sd].is_string(),
            "{}",
            m["made_with"]
        );
        edit(&mut m, &sd, &zeros);
        std::fs::write(c.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        let o = merge(&recipe, &tmp.path().join("m3"), &[&a, &c]);
        assert_refused(&o, &format!("merged shards of other {what}"), needles);
    }
    std::fs::write(c.join("manifest.json"), &original).unwrap();
    // A shard run in the folder of the whole run finds its items done and keeps
    // results.json whole (it used to cut it to the shard's items).
    let o = run(&recipe, &whole, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        tree(&whole) == tw,
        "a shard run changed the whole run's folder"
    );
    // With an item of the other shard gone, results.json keeps every item still finished
    // there (it used to be cut to the shard's own).
    let results = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap()
    };
    let items_in = |dir: &Path| results(dir)["items"].as_array().unwrap().len();
    // Items are in plan order, two arms per cell, and shard 1/2 holds the odd cells.
    let other = whole.join(results(&whole)["items"][2]["image"].as_str().unwrap());
    let before = items_in(&whole);
    std::fs::remove_file(&other).unwrap();
    let o = run(&recipe, &whole, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(items_in(&whole), before - 1);
    // Merging with a shard missing is refused by name.
    let o = merge(&recipe, &tmp.path().join("m2"), &[&a]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in no shard"), "{}", stderr(&o));
    // A shard folder begun by a build that split by item (its manifest does not say how) is
    // not finished with this build's cells.
    let old = tmp.path().join("old");
    let o = run(&recipe, &old, &["--shard", "0/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(old.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["shard_split"], "cell");
    m.as_object_mut().unwrap().remove("shard_split");
    std::fs::write(old.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let first = results(&old)["items"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(old.join(first)).unwrap();
    let o = run(&recipe, &old, &["--shard", "0/2"]);
    assert_refused(
        &o,
        "finished an old shard",
        &["older artguide", "split by item"],
    );
    // Without --shard it is an unsharded run's resume, as before.
    let o = run(&recipe, &old, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A shard given twice, by any path, would count its items twice; a missing one is named.
    let again = a.join("..").join(a.file_name().unwrap());
    let o = merge(&recipe, &tmp.path().join("m5"), &[&a, &b, &again]);
    assert_refused(&o, "merged a shard twice", &["is the shard", "again"]);
    let o = merge(
        &recipe,
        &tmp.path().join("m5"),
        &[&a, &tmp.path().join("nope")],
    );
    assert_refused(
        &o,
        "merged a missing shard",
        &["nope", "no such shard folder"],
    );
    assert!(!tmp.path().join("m5").exists());
    // The other shard run into a shard's folder: the folder's results hold both, and the
    // counts say which this run made and which another shard had.
    let done = done_event(&run_json(&recipe, &a, &["--shard", "1/2"]));
    let count = |k: &str| done[k].as_u64().unwrap();
    assert_eq!(count("images"), 12, "{done}");
    assert_eq!(
        count("made") + count("skipped") + count("other_shards"),
        12,
        "{done}"
    );
    assert_eq!(count("other_shards"), 6, "{done}");
}

#[test]
fn a_killed_run_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = smoke("compare");
    let whole = tmp.path().join("whole");
    let o = run(&recipe, &whole, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = tree(&whole);

    // Kill at seeded random moments (loading, mid-step, mid-write), a bounded number of times.
    let out = tmp.path().join("killed");
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..5 {
        let delay = std::time::Duration::from_millis(rng.random_range(30..2500));
        let mut child = bin()
            .args(["--quiet", "run"])
            .arg(&recipe)
            .arg("--out")
            .arg(&out)
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill(); // SIGKILL on Unix
        let _ = child.wait();
        // Whatever is visible now is complete: every visible image parses as a PNG.
        if out.join("images").exists() {
            for (rel, bytes) in tree_raw(&out.join("images")) {
                if rel.ends_with(".png") {
                    assert!(image::load_from_memory(&bytes).is_ok(), "partial {rel}");
                }
            }
        }
    }
    let o = run(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = tree(&out);
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&expected));
    for ((n, x), (_, y)) in got.iter().zip(&expected) {
        assert!(x == y, "{n} differs from the uninterrupted run");
    }
}

/// Visible files under `dir` (no checks), for looking at a killed run.
fn tree_raw(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

#[test]
fn bad_recipes_are_one_clear_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(smoke("compare")).unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            good.replace("  steps: 4\n", "  steps: 4\n  stpes: 5\n"),
            vec!["stpes", ":10:", "unknown field"],
        ),
        (
            "wrong type",
            good.replace("seeds: {start: 0, count: 3}", "seeds: lots"),
            vec![
                "seeds",
                ":",
                "expected a list of seeds (non-negative integers) or {start, count}",
            ],
        ),
        (
            "a text where a target's map goes",
            good.replace(
                "      - text: an impressionist painting\n        labels: {style: Impressionism}\n",
                "      - an impressionist painting\n",
            ),
            // No Rust type name (`expected struct TargetSpec`) reaches the author.
            vec![
                "targets[0]",
                "string \"an impressionist painting\", expected a map",
            ],
        ),
        (
            "negative steps",
            good.replace("steps: 4", "steps: -4"),
            vec!["steps", "-4", ":9:", "expected a whole number >= 0"],
        ),
        (
            "missing file",
            good.replace("../../probes/art.yaml", "../../probes/nope.yaml"),
            vec!["suite", "nope.yaml", "no such file"],
        ),
        (
            "escaping name",
            good.replace("name: smoke-compare", "name: ../../etc"),
            vec!["name", "../../etc", "plain folder name"],
        ),
        (
            "unknown target label",
            good.replace("style: Impressionism", "style: Vaporwave"),
            vec!["targets[0].labels.style", "Vaporwave"],
        ),
        (
            "two baselines",
            good.replace(
                "      - name: clip-text\n        guidance:",
                "      - name: other\n      - name: clip-text\n        guidance:",
            ),
            vec!["arms", "baseline"],
        ),
        (
            "strength without an init image",
            good.replace("  steps: 4\n", "  steps: 4\n  strength: 0.5\n"),
            vec!["generation.strength", "only to img2img"],
        ),
        (
            "strength that leaves no step",
            good.replace(
                "  steps: 4\n",
                "  steps: 4\n  init_image: ../assets/swirls.png\n  strength: 0.2\n",
            ),
            vec!["generation.strength", "no denoising step"],
        ),
        (
            "empty subject in a guidance prompt",
            good.replace(
                "subjects: [a harbour, a village]",
                "subjects: [a harbour, \"\"]",
            )
            .replace("text: \"{target}\"", "text: \"{subject}\""),
            vec!["s01", "empty text"],
        ),
        (
            "eta with a scheduler that has none",
            good.replace(
                "  steps: 4\n",
                "  steps: 4\n  scheduler: euler\n  eta: 0.5\n",
            ),
            vec!["generation.eta", "ddim scheduler only", "euler"],
        ),
        (
            "negative prompt without classifier-free guidance",
            good.replace(
                "guidance_scale: 3.0",
                "guidance_scale: 1.0\n  negative_prompt: blurry",
            ),
            vec!["generation.negative_prompt", "guidance_scale 1 (<= 1)"],
        ),
        (
            "guided range between the steps",
            good.replace(
                "          cutouts: 2\n",
                "          cutouts: 2\n          start: 0.8\n",
            ),
            vec![
                "arms[1] (clip-text).guidance.start/end`",
                "[0.8, 1)",
                "none of the 4 denoising steps",
            ],
        ),
        (
            "guidance value named as the recipe's field, not the command-line option",
            good.replace(
                "          cutouts: 2\n",
                "          cutouts: 2\n          every: 0\n",
            ),
            vec!["arms[1] (clip-text).guidance.every`: 0: expected at least 1"],
        ),
        (
            "taesd for another decoder",
            good.replace("decoder: taesd", "decoder: linear"),
            vec![
                "arms[1] (clip-text).guidance.taesd",
                "tiny-taesd",
                "guidance decoder is linear",
            ],
        ),
        (
            "negative eta",
            good.replace("  steps: 4\n", "  steps: 4\n  eta: -1\n"),
            vec!["generation.eta", "-1", ">= 0"],
        ),
        (
            "zero width",
            good.replace("width: 32", "width: 0"),
            vec!["generation.width", "positive image size"],
        ),
        (
            "a folder as init image",
            good.replace("  steps: 4\n", "  steps: 4\n  init_image: ../assets\n"),
            vec!["generation.init_image", "is a folder"],
        ),
        // Found only once the model is loaded, still before anything is written.
        (
            "size off the latent grid",
            good.replace("width: 32", "width: 33"),
            vec!["generation.width", "33"],
        ),
        (
            "init image of another size",
            good.replace(
                "  steps: 4\n",
                "  steps: 4\n  init_image: ../assets/swirls.png\n",
            ),
            vec!["generation.init_image", "swirls.png", "not resized"],
        ),
        (
            "init image whose own size does not fit",
            good.replace(
                "  width: 32\n  height: 32\n",
                "  init_image: ../../tests/fixtures/clip/images/img0_37x23_rgb.png\n",
            ),
            vec![
                "generation.init_image",
                "img0_37x23_rgb.png: the image's width: 37",
            ],
        ),
        (
            "not a model folder",
            good.replace(
                "model: ../../tests/fixtures/tiny-sd-a",
                "model: ../../tests/fixtures/tiny-taesd",
            ),
            vec!["tiny-taesd", "model_index.json"],
        ),
    ];
    for (what, text, needles) in cases {
        let name = format!("bad-{}", what.replace(' ', "-"));
        let out = tmp.path().join(&name);
        let o = run_text(&name, &text, &out, &[]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: expected failure");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{what}: one line expected: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{what}: `{n}` missing from: {err}");
        }
        // Nothing ran, so there is nothing to resume.
        assert!(!err.contains("resume"), "{what}: {err}");
        assert!(!out.exists(), "{what}: the output folder was created");
    }
    // A later arm's bad setting (here its style image is over --max-pixels) fails before the
    // first image, not after the earlier arms' images are made.
    let style = std::fs::read_to_string(smoke("style-transfer")).unwrap();
    let (head, arms) = style.split_once("      - name: style-image\n").unwrap();
    let (style_arm, text_arm) = arms.split_once("      - name: text\n").unwrap();
    let reordered =
        format!("{head}      - name: text\n{text_arm}      - name: style-image\n{style_arm}");
    let out = tmp.path().join("late-arm");
    let o = run_text("bad-late-arm", &reordered, &out, &["--max-pixels", "100"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "late arm: expected failure");
    assert!(err.contains("swirls.png") && err.contains("100"), "{err}");
    assert!(!out.exists(), "late arm: the output folder was created");

    // An eta that `auto` leaves unused (the model's scheduler is Euler) is said once the
    // model is loaded (a named scheduler other than DDIM is a field error at load).
    let euler = tmp.path().join("euler-model");
    let fixture = repo().join("tests/fixtures/tiny-sd-a");
    for e in walk(&fixture) {
        let to = euler.join(e.strip_prefix(&fixture).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&e, &to).unwrap();
    }
    let sched = euler.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace("DDIMScheduler", "EulerDiscreteScheduler");
    std::fs::write(&sched, text).unwrap();
    let with_eta = good
        .replace(
            "model: ../../tests/fixtures/tiny-sd-a",
            &format!("model: {}", euler.display()),
        )
        .replace("  steps: 4\n", "  steps: 4\n  eta: 0.5\n")
        .replace("seeds: {start: 0, count: 3}", "seeds: [0]");
    let o = run_text("eta-auto", &with_eta, &tmp.path().join("eta-auto"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("generation.eta 0.5 is ignored") && stderr(&o).contains("chose euler"),
        "{}",
        stderr(&o)
    );

    // A prompt longer than the text encoder reads is said to be cut, once per prompt.
    let long = good
        .replace(
            "subjects: [a harbour, a village]",
            &format!("subjects: [\"{}\"]", "a harbour at dusk, ".repeat(30)),
        )
        .replace("seeds: {start: 0, count: 3}", "seeds: [0]");
    let o = run_text("long-prompt", &long, &tmp.path().join("long"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("the rest is ignored").count(),
        1,
        "{}",
        stderr(&o)
    );

    // A resume reads the recipe, not its text: comments and layout may change, and the
    // finished run is recognised as this recipe's.
    let commented = format!(
        "# rerun after review\n{}",
        long.replace("  steps: 4\n", "  steps:   4   # as before\n")
            .replace("guidance_scale: 3.0", "guidance_scale: 3")
    );
    assert_ne!(commented, long);
    let path = smoke(".test-long-prompt-commented");
    std::fs::write(&path, &commented).unwrap();
    let o = run_json(&path, &tmp.path().join("long"), &[]);
    let _ = std::fs::remove_file(&path);
    let done = done_event(&o);
    assert_eq!(
        (done["made"].as_u64(), done["skipped"].as_u64()),
        (Some(0), Some(2))
    );
    // A change of content is another recipe.
    let o = run_text(
        "long-prompt",
        &long.replace("steps: 4", "steps: 5"),
        &tmp.path().join("long"),
        &[],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("different recipe"),
        "{}",
        stderr(&o)
    );

    // A folder holding another recipe's run is not reused without --force.
    let out = tmp.path().join("taken");
    let o = run(&smoke("probeset"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&smoke("period-shift"), &out, &[]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("different recipe")
            && !stderr(&o).contains("resume"),
        "{}",
        stderr(&o)
    );
    // With --force the new run replaces the old one whole: no image or report of the old
    // run stays beside it as if it were the new run's (a person's annotation.csv stays).
    std::fs::write(out.join("report.html"), "old report").unwrap();
    std::fs::write(out.join("annotation.csv"), "answers").unwrap();
    let o = run(&smoke("period-shift"), &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let mut listed: Vec<String> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| it["image"].as_str().unwrap().to_string())
        .collect();
    let mut on_disk: Vec<String> = tree(&out)
        .into_iter()
        .map(|(rel, _)| rel)
        .filter(|rel| rel.starts_with("images/") && rel.ends_with(".png"))
        .collect();
    listed.sort();
    on_disk.sort();
    assert_eq!(on_disk, listed);
    assert!(!out.join("report.html").exists());
    assert_eq!(
        std::fs::read(out.join("annotation.csv")).unwrap(),
        b"answers"
    );
    // --dry-run prints the plan and writes nothing.
    let out = tmp.path().join("dry");
    let o = bin()
        .args(["run", "--dry-run"])
        .arg(smoke("compare"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("12 images"), "{text}");
    assert!(
        text.contains("estimated time:") && text.contains(" min ("),
        "{text}"
    );
    assert!(!out.exists());
    // A size the model cannot make fails the dry run as it would the run.
    let off_grid = good.replace("width: 32", "width: 33");
    let o = run_text("dry-off-grid", &off_grid, &out, &["--dry-run"]);
    assert!(
        !o.status.success() && stderr(&o).contains("generation.width"),
        "{}",
        stderr(&o)
    );
    // An img2img plan counts the steps each image really runs, not the whole schedule.
    let text = std::fs::read_to_string(smoke("compare")).unwrap().replace(
        "  steps: 4\n",
        "  steps: 4\n  init_image: ../assets/swirls.png\n  strength: 0.5\n",
    );
    let o = run_text("img2img-plan", &text, &out, &["--dry-run"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("2 of 4 steps each (img2img) = 24 UNet steps"),
        "{text}{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// A recipe whose arms are all unguided is still judged by its guide CLIP, so its images
/// pair with a guided run's on both judges (the guide-CLIP row used to vanish from compare).
#[test]
fn the_guide_clip_judges_a_baseline_only_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(smoke("compare")).unwrap();
    let cut = text.find("      - name: clip-text").unwrap();
    let text = text[..cut].replace("count: 3", "count: 1");
    let out = tmp.path().join("base");
    let o = run_text("baseline-only", &text, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let guide = results["guide_clip"]
        .as_str()
        .unwrap_or_else(|| panic!("{results}"));
    assert!(guide.contains("tiny-clip-a"), "{guide}");
    for it in results["items"].as_array().unwrap() {
        let probes = it["probes"].as_object().unwrap();
        assert!(probes.contains_key(guide) && probes.len() == 2, "{it}");
    }
}

#[test]
fn a_dry_run_checks_memory_before_timing_steps() {
    // With 1 MiB available, the smoke recipe's size cannot fit: the dry run fails as the run
    // would, instead of timing steps (which, at a size that really cannot fit, exhausted the
    // memory).
    let tmp = tempfile::tempdir().unwrap();
    let o = bin()
        .env("ARTGUIDE_MEMORY_LIMIT_MB", "1")
        .args(["run", "--dry-run"])
        .arg(smoke("compare"))
        .arg("--out")
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert_refused(
        &o,
        "a dry run of a size that cannot fit",
        &["compare.yaml", "generation.size", "working memory"],
    );
}

#[test]
fn shipped_recipes_plan_without_network() {
    for e in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let o = bin().args(["run", "--dry-run"]).arg(&p).output().unwrap();
            assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
        }
    }
}

/// Runs `probeset` on `recipe` into `out` and returns its results.json.
fn probeset(recipe: &Path, out: &Path) -> serde_json::Value {
    let o = bin()
        .args(["--quiet", "probeset"])
        .arg(recipe)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap()
}

/// `probeset`: labels, CLIP scores and an annotation sheet whose form references only
/// existing images; a filled-in sheet goes straight into `agree`.
#[test]
fn probeset_writes_a_sheet_that_agree_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ps");
    let r = probeset(&smoke("probeset"), &out);
    let items = r["items"].as_array().unwrap();
    let read = |name: &str| -> Vec<Vec<String>> {
        std::fs::read_to_string(out.join(name))
            .unwrap()
            .lines()
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    };
    let labels = read("labels.csv");
    assert_eq!(labels.len(), items.len() + 1);
    let col = |rows: &[Vec<String>], name: &str| rows[0].iter().position(|c| c == name).unwrap();
    let (ci, cs, cp) = (
        col(&labels, "image"),
        col(&labels, "intended_style"),
        col(&labels, "intended_period"),
    );
    for (row, it) in labels[1..].iter().zip(items) {
        assert_eq!(row[ci], it["image"].as_str().unwrap());
        assert_eq!(row[cs], it["target"]["labels"]["style"].as_str().unwrap());
        assert_eq!(row[cp], it["target"]["labels"]["period"].as_str().unwrap());
    }
    let scores = read("clip_scores.csv");
    let cps = col(&scores, "p_intended_style");
    let probe_clip = r["probe_clip"].as_str().unwrap();
    for (row, it) in scores[1..].iter().zip(items) {
        let ans = it["probes"][probe_clip]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["probe"] == "style")
            .unwrap();
        let k = ans["labels"]
            .as_array()
            .unwrap()
            .iter()
            .position(|l| l == &it["target"]["labels"]["style"])
            .unwrap();
        let want = ans["probs"][k].as_f64().unwrap();
        assert!((row[cps].parse::<f64>().unwrap() - want).abs() < 1e-6);
    }
    let html = std::fs::read_to_string(out.join("annotation.html")).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert_blind_sheet(&out, &labels, items);
    // Rating the sheet's copy means rating the run's image: same pixels, no parameters.
    let cid = col(&labels, "sheet_id");
    for row in &labels[1..] {
        let orig = artguide::output::read_png(&out.join(&row[ci])).unwrap();
        let copy =
            artguide::output::read_png(&out.join(format!("sheet/{}.png", row[cid]))).unwrap();
        assert_eq!(copy.rgb, orig.rgb, "{}", row[ci]);
        assert!(orig.parameters.is_some() && copy.parameters.is_none());
    }
    // The same recipe gives the same sheet, byte for byte; stale sheet images go.
    let before = tree(&out);
    std::fs::remove_file(out.join("annotation.html")).unwrap();
    std::fs::remove_file(out.join("sheet/0001.png")).unwrap();
    std::fs::write(out.join("sheet/9999.png"), b"stale").unwrap();
    let o = bin()
        .args(["--quiet", "probeset"])
        .arg(smoke("probeset"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tree(&out) == before, "a second probe set changed the files");
    // A rater's filled sheet (ratings here: a made-up function of the row) feeds `agree`,
    // matched on `sheet_id` whether named or found as the shared column.
    let sheet = read("annotation.csv");
    let (ca, cps) = (col(&sheet, "adherence"), col(&sheet, "perceived_style"));
    let mut filled = String::new();
    for (k, row) in sheet.iter().enumerate() {
        let mut row = row.clone();
        if k > 0 {
            row[ca] = (1 + (k * 7) % 5).to_string();
            row[cps] = "Baroque".to_string();
        }
        filled.push_str(&row.join(","));
        filled.push('\n');
    }
    let ratings = tmp.path().join("ratings.csv");
    std::fs::write(&ratings, filled).unwrap();
    for key in [Some("sheet_id"), None] {
        let o = bin()
            .args(["--json", "agree", "--scores"])
            .arg(out.join("clip_scores.csv"))
            .arg("--ratings")
            .arg(&ratings)
            .args([
                "--score-column",
                "p_intended_style",
                "--rating-column",
                "adherence",
            ])
            .args(key.map(|k| ["--key", k]).iter().flatten())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(a["correlations"]["n"], items.len());
        assert_eq!(a["key"], "sheet_id", "{a}");
        assert!(
            a.get("raters").is_none(),
            "one rater has no rater agreement: {a}"
        );
    }
    // The form saves one file per rater, named by the rater; `agree` takes them all, rates
    // each row by their mean and reports how the raters agree.
    assert!(html.contains("id=\"rater\"") && html.contains("'annotation-' +"));
    assert!(
        html.contains("localStorage"),
        "answers are not kept while rating"
    );
    let mut second = String::new();
    for (k, row) in sheet.iter().enumerate() {
        let mut row = row.clone();
        if k > 0 {
            row[ca] = if k == 2 {
                String::new()
            } else {
                (1 + (k * 3) % 5).to_string()
            };
            row[cps] = ["Baroque", "Cubism"][k % 2].to_string();
        }
        second.push_str(&row.join(","));
        second.push('\n');
    }
    let ratings2 = tmp.path().join("annotation-rater2.csv");
    std::fs::write(&ratings2, second).unwrap();
    let agree2 = |mode: &str| {
        bin()
            .args([mode, "agree", "--scores"])
            .arg(out.join("clip_scores.csv"))
            .arg("--ratings")
            .arg(&ratings)
            .arg(&ratings2)
            .args([
                "--score-column",
                "p_intended_style",
                "--rating-column",
                "adherence",
            ])
            .output()
            .unwrap()
    };
    let o = agree2("--json");
    assert!(o.status.success(), "{}", stderr(&o));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(a["correlations"]["n"], items.len());
    let raters = a["raters"]["raters"].as_array().unwrap();
    assert_eq!(raters.len(), 2);
    // The row rater 2 left blank has only rater 1's rating: no pair for either rater.
    assert_eq!(raters[0]["n"], items.len() - 1);
    assert_eq!(a["raters"]["units"], items.len() - 1);
    assert!(raters[1]["file"]
        .as_str()
        .unwrap()
        .ends_with("annotation-rater2.csv"));
    let o = agree2("--quiet");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("2 raters") && text.contains("Krippendorff"),
        "{text}"
    );
    // The style rater 2 chose against CLIP's top style, as labels.
    let o = bin()
        .args(["--json", "agree", "--nominal", "--scores"])
        .arg(out.join("clip_scores.csv"))
        .arg("--ratings")
        .arg(&ratings)
        .arg(&ratings2)
        .args([
            "--score-column",
            "top_style",
            "--rating-column",
            "perceived_style",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scores = read("clip_scores.csv");
    let (ct, cs) = (col(&scores, "top_style"), col(&scores, "sheet_id"));
    let cid = col(&sheet, "sheet_id");
    let chosen: std::collections::HashMap<&str, &str> = sheet
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, r)| (r[cid].as_str(), ["Baroque", "Cubism"][k % 2]))
        .collect();
    // Rater 1 chose Baroque everywhere: each row's share is the mean of two matches.
    let same: usize = scores[1..]
        .iter()
        .map(|r| usize::from(chosen[r[cs].as_str()] == r[ct]) + usize::from(r[ct] == "Baroque"))
        .sum();
    assert_eq!(a["n"], items.len());
    assert_eq!(a["raters"][0]["n"], items.len());
    assert_eq!(a["raters"][1]["n"], items.len());
    let share = a["agreement"]["estimate"].as_f64().unwrap();
    assert!(
        (share - same as f64 / (2 * items.len()) as f64).abs() < 1e-12,
        "{a}"
    );
}

/// Ctrl-C (SIGINT) stops after the current step: exit 130, a message saying how to resume,
/// nothing partial visible; running again completes to the uninterrupted bytes.
#[test]
fn ctrl_c_stops_cleanly_and_says_how_to_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = smoke("compare");
    let whole = tmp.path().join("whole");
    let o = run(&recipe, &whole, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("int");
    let child = bin()
        .args(["--quiet", "run"])
        .arg(&recipe)
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !out.join("manifest.json").exists() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    if o.status.success() {
        // The run finished before the signal landed: nothing to check but the bytes.
        eprintln!("run finished before SIGINT");
    } else {
        assert_eq!(o.status.code(), Some(130), "{err}");
        // The cause first, then what to do about it.
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: interrupted (Ctrl-C)")
                && last.ends_with("run the same command to resume"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = run(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (tree(&whole), tree(&out));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{n} differs after an interrupted run");
    }
}

/// A symbolic link planted inside a run folder is not written through.
#[test]
fn symlinks_inside_a_run_are_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let o = run(&smoke("probeset"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(out.join("images/pastiche")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("images/pastiche")).unwrap();
    let o = run(&smoke("probeset"), &out, &[]);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through the link"
    );
}

/// A run resumes only with the scheduler it was started with: the manifest records what
/// `auto` resolved to, and a mismatch (another artguide resolving it differently, simulated
/// by editing the record) is one clear line that changes nothing.
#[test]
fn a_resumed_run_keeps_its_scheduler_and_models() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = run(&smoke("probeset"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = out.join("manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // tiny-sd-a ships a DDIMScheduler config, which `auto` takes.
    assert_eq!(manifest["scheduler"], "ddim");

    // Resuming with nothing left to do, or with the same scheduler, is fine.
    let image = out.join("images/pastiche/s00-t01-seed0/baseline.png");
    let _ = std::fs::remove_file(out.join("results.json"));
    let first = std::fs::read(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    std::fs::remove_file(&image).unwrap();
    let o = run(&smoke("probeset"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&image).unwrap(), first);

    // Resumed from the recipe at another path: the answers of the items made before and
    // those made now are under one spelling of each model (they were under two, which
    // compare counted as two probe models).
    let elsewhere = repo().join("recipes/smoke/../smoke/probeset.yaml");
    std::fs::remove_file(&image).unwrap();
    let o = run(&elsewhere, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let keys: std::collections::BTreeSet<&String> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|it| it["probes"].as_object().unwrap().keys())
        .collect();
    assert_eq!(keys.len(), 1, "answers under several spellings: {keys:?}");
    assert_eq!(keys.first().unwrap().as_str(), results["probe_clip"]);
    assert!(results["probe_clip"]
        .as_str()
        .unwrap()
        .contains("smoke/../smoke"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    std::fs::remove_file(&image).unwrap();
    manifest["scheduler"] = "euler".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    assert!(!image.exists());
    let before = tree(&out);
    let o = run(&smoke("probeset"), &out, &[]);
    assert_refused(
        &o,
        "resumed with another scheduler",
        &["manifest.json", "scheduler euler", "ddim"],
    );
    assert!(
        tree(&out) == before,
        "the refused resume changed the run folder"
    );
}

/// The recipe's input files are part of what a run was made with: a suite edited between a
/// run and its resume would mix two label lists in one run (compare then paired them label
/// by label), so the resume is refused, naming the file; restored, it resumes.
#[test]
fn a_resume_with_an_edited_input_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tmp.path().join("suite.yaml");
    std::fs::copy(repo().join("probes/art.yaml"), &suite).unwrap();
    let recipe = tmp.path().join("r.yaml");
    let text = std::fs::read_to_string(smoke("probeset"))
        .unwrap()
        .replace("../../", &format!("{}/", repo().display()))
        .replace(
            &format!("{}/probes/art.yaml", repo().display()),
            "suite.yaml",
        )
        .replace(
            "subjects: [a portrait, a landscape]",
            "subjects: [a portrait]",
        );
    std::fs::write(&recipe, text).unwrap();
    let out = tmp.path().join("run");
    let o = run(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let image = out.join("images/pastiche/s00-t01-seed0/baseline.png");
    std::fs::remove_file(&image).unwrap();
    let original = std::fs::read(&suite).unwrap();
    std::fs::write(&suite, [&original[..], b"\n# edited\n"].concat()).unwrap();
    let before = tree(&out);
    let o = run(&recipe, &out, &[]);
    assert_refused(&o, "resumed with an edited suite", &["the file suite.yaml"]);
    assert!(
        tree(&out) == before,
        "the refused resume changed the run folder"
    );
    std::fs::write(&suite, &original).unwrap();
    let o = run(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(image.is_file());
    // An item whose sidecar is gone is made again (it counted as done, and a merge of the
    // folder then failed on the missing file).
    let sidecar = image.with_extension("json");
    let png = std::fs::read(&image).unwrap();
    std::fs::remove_file(&sidecar).unwrap();
    let o = run(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(sidecar.is_file());
    assert_eq!(std::fs::read(&image).unwrap(), png);
}

/// One recipe text in three folders, each with its own SD model under the same relative
/// path: a run made from one resumes from a folder holding the same weights (though the first
/// folder still exists), and not from one holding other weights, nor in another dtype; a
/// finished run, which loads nothing, is not relabelled with another existing folder.
#[test]
fn a_recipe_elsewhere_resumes_only_with_the_same_models() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "name: moved\nmodel: models/sd\nprobe_clip: {}\nsuite: {}\n\
         generation: {{steps: 2, width: 32, height: 32}}\n\
         experiments:\n  - name: e\n    prompt: \"{{subject}}\"\n    subjects: [a, b]\n    seeds: [0]\n",
        repo().join("tests/fixtures/clip/tiny-clip-b").display(),
        repo().join("probes/art.yaml").display()
    );
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.path().is_dir() {
                std::fs::create_dir_all(to.join(e.file_name())).unwrap();
                for f in std::fs::read_dir(e.path()).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), to.join(e.file_name()).join(f.file_name())).unwrap();
                }
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    };
    for (d, model) in [("a", "tiny-sd-a"), ("b", "tiny-sd-b"), ("c", "tiny-sd-a")] {
        copy(
            &repo().join("tests/fixtures").join(model),
            &tmp.path().join(d).join("models/sd"),
        );
        std::fs::write(tmp.path().join(d).join("r.yaml"), &text).unwrap();
    }
    let out = tmp.path().join("run");
    let o = run(&tmp.path().join("a/r.yaml"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Finished, nothing is loaded to weigh, so the paths decide: b/'s folder is another
    // existing folder (results.json would otherwise name it for a/'s answers).
    let finished = tree(&out);
    let o = run(&tmp.path().join("b/r.yaml"), &out, &[]);
    assert_refused(
        &o,
        "a finished run relabelled with another folder's model",
        &["`models/sd`", "a/models/sd", "b/models/sd"],
    );
    assert!(tree(&out) == finished, "the refused resume changed the run");
    let image = out.join("images/e/s01-t00-seed0/baseline.png");
    std::fs::remove_file(&image).unwrap();
    let before = tree(&out);
    let o = run(&tmp.path().join("b/r.yaml"), &out, &[]);
    assert_refused(
        &o,
        "resumed with other weights",
        &["manifest.json", "weights of", "b/models/sd", "sha256"],
    );
    assert!(
        tree(&out) == before,
        "the refused resume changed the run folder"
    );
    let o = run(&tmp.path().join("a/r.yaml"), &out, &["--dtype", "f16"]);
    assert_refused(&o, "resumed in another dtype", &["dtype f32", "has f16"]);
    assert!(
        tree(&out) == before,
        "the refused resume changed the run folder"
    );
    // c/ holds a copy of a/'s model: the same weights, whatever the path.
    let o = run(&tmp.path().join("c/r.yaml"), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let model = results["model"].as_str().unwrap();
    assert!(model.ends_with("c/models/sd"), "{model}");
    let made_with = &results["made_with"];
    assert_eq!(made_with["dtype"], "f32");
    assert_eq!(made_with["device"], "cpu");
    let fingerprinted: Vec<&String> = made_with["fingerprints"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        fingerprinted.len(),
        2,
        "the SD model and the probe CLIP: {made_with}"
    );
    assert!(made_with["fingerprints"][model].is_string(), "{made_with}");
    for it in results["items"].as_array().unwrap() {
        let keys: Vec<&String> = it["probes"].as_object().unwrap().keys().collect();
        assert_eq!(keys, [results["probe_clip"].as_str().unwrap()], "{it}");
    }
}

/// The annotation form of the probe set in `out` is blind: images only under neutral ids
/// (`sheet/<id>.png`), no arm name, path or cell anywhere in the page or the blank sheet,
/// not in plan order, and each adherence question shows its image's intended labels.
fn assert_blind_sheet(out: &Path, labels: &[Vec<String>], items: &[serde_json::Value]) {
    let html = std::fs::read_to_string(out.join("annotation.html")).unwrap();
    let sheet_csv = std::fs::read_to_string(out.join("annotation.csv")).unwrap();
    for it in items {
        for leak in [
            it["arm"].as_str().unwrap(),
            it["id"].as_str().unwrap(),
            it["cell"].as_str().unwrap(),
            it["image"].as_str().unwrap(),
        ] {
            assert!(!html.contains(leak), "the form shows `{leak}`");
            assert!(!sheet_csv.contains(leak), "annotation.csv shows `{leak}`");
        }
    }
    assert!(!html.contains("images/") && !sheet_csv.contains("images/"));
    let col = |name: &str| labels[0].iter().position(|c| c == name).unwrap();
    let cid = col("sheet_id");
    let intended: Vec<usize> = labels[0]
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with("intended_"))
        .map(|(k, _)| k)
        .collect();
    // labels.csv is in plan order; the form follows its ids.
    let plan: Vec<&str> = labels[1..].iter().map(|r| r[cid].as_str()).collect();
    let sections: Vec<&str> = html.split("<section ").skip(1).collect();
    assert_eq!(sections.len(), items.len());
    let shown: Vec<&str> = sections
        .iter()
        .map(|s| {
            s.split("data-key=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    let mut sorted = plan.clone();
    sorted.sort();
    assert_eq!(shown, sorted, "the form is not in sheet-id order");
    assert_ne!(plan, sorted, "the sheet is in plan order");
    for (s, id) in sections.iter().zip(&shown) {
        let srcs: Vec<&str> = s
            .split("src=\"")
            .skip(1)
            .map(|s| s.split('"').next().unwrap())
            .collect();
        assert_eq!(srcs, [format!("sheet/{id}.png")]);
        assert!(out.join(srcs[0]).is_file(), "{} does not exist", srcs[0]);
        let row = labels[1..].iter().find(|r| r[cid] == *id).unwrap();
        let adherence = s.split("data-col=\"adherence\"").next().unwrap();
        let adherence = adherence.rsplit("<details").next().unwrap();
        for &k in &intended {
            let probe = labels[0][k].trim_start_matches("intended_");
            let want = format!("{probe} {}", row[k]);
            assert!(
                adherence.contains(&want),
                "{id}: the adherence question does not show `{want}`: {adherence}"
            );
        }
    }
}

/// A probe set of a guided recipe blinds the arms too (baseline and guided alike).
#[test]
fn probeset_of_a_guided_recipe_hides_the_arms() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ps");
    let r = probeset(&smoke("compare"), &out);
    let items = r["items"].as_array().unwrap();
    assert!(items.iter().any(|i| i["baseline"] == false));
    let labels: Vec<Vec<String>> = std::fs::read_to_string(out.join("labels.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_blind_sheet(&out, &labels, items);
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
