//! Scoring probe answers against true labels: accuracy, top-k, per-class recall and the
//! confusion matrix per probe.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::runner::ProbeResults;
use super::suite::Suite;
use super::table::Table;
use crate::{Error, Result};

/// One probe's scores against the true labels.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeScore {
    pub probe: String,
    /// Images with a true label for this probe.
    pub n: usize,
    pub accuracy: f64,
    pub k: usize,
    pub top_k_accuracy: f64,
    /// Label -> recall (None when the label never occurs as a true label).
    pub recall: BTreeMap<String, Option<f64>>,
    /// Labels in suite order; `confusion[t][p]` counts true label t predicted as p.
    pub labels: Vec<String>,
    pub confusion: Vec<Vec<usize>>,
}

/// Per probe while counting: labels, confusion counts, images, top-k hits.
type Tally = (Vec<String>, Vec<Vec<usize>>, usize, usize);

/// Scores of every probe that has true labels, plus label rows that matched no image.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub labels_file: String,
    pub probes: Vec<ProbeScore>,
    pub unmatched_rows: usize,
}

/// Finds the image a labels row names among the probed images: the one probed under that
/// path (`./` aside), else the very file the value names when it exists (an absolute path, or
/// one relative to the working folder), else the only one whose path ends with it in whole
/// components (so `baseline.png` or `cellA/baseline.png`). Several such images are an error
/// naming the file, the line and the candidates: run folders repeat file names in every cell,
/// and scoring the first of them would count one image's answer for all.
struct ImageMatcher<'a> {
    /// Each probed image's path without `.` components.
    paths: Vec<std::path::PathBuf>,
    labels_csv: &'a Path,
    /// Each image's file identity, made on the first value that names an existing file.
    identities: std::cell::OnceCell<Vec<(u64, u64, std::path::PathBuf)>>,
}

/// `p` without its `.` components (`./a/./b.png` is `a/b.png`).
fn without_dots(p: &Path) -> std::path::PathBuf {
    p.components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect()
}

impl<'a> ImageMatcher<'a> {
    fn new<'p>(paths: impl Iterator<Item = &'p Path>, labels_csv: &'a Path) -> Self {
        ImageMatcher {
            paths: paths.map(without_dots).collect(),
            labels_csv,
            identities: std::cell::OnceCell::new(),
        }
    }

    /// The index of the image that `name` (a labels row's `image` value, on `line`) names.
    fn find(&self, name: &str, line: usize) -> Result<Option<usize>> {
        let wanted = without_dots(Path::new(name));
        // An empty path is a suffix of every path.
        if wanted.as_os_str().is_empty() {
            return Ok(None);
        }
        if let Some(i) = self.paths.iter().position(|p| *p == wanted) {
            return Ok(Some(i));
        }
        if wanted.is_file() {
            let ids = self.identities.get_or_init(|| {
                self.paths
                    .iter()
                    .map(|p| crate::output::file_identity(p))
                    .collect()
            });
            let id = crate::output::file_identity(&wanted);
            if let Some(i) = ids.iter().position(|x| *x == id) {
                return Ok(Some(i));
            }
        }
        let fits: Vec<usize> = (0..self.paths.len())
            .filter(|&i| self.paths[i].ends_with(&wanted))
            .collect();
        match fits[..] {
            [] => Ok(None),
            [i] => Ok(Some(i)),
            _ => {
                let c: Vec<&Path> = fits.iter().map(|&i| self.paths[i].as_path()).collect();
                Err(Error::field(
                    self.labels_csv,
                    format!("line {line}: image"),
                    ambiguous(name, &c),
                ))
            }
        }
    }
}

/// The labels each (image, probe) was given so far, with their lines: a second row for the
/// same image and probe is counted once when it agrees, and is an error when it does not
/// (spellings such as `./x.png` and `x.png` name one image, which must not count twice).
#[derive(Default)]
struct GivenLabels(std::collections::HashMap<(usize, usize), (usize, usize)>);

impl GivenLabels {
    /// Whether row `line` gives image `image` its first label `label` for probe `probe`.
    fn first(
        &mut self,
        (image, probe, label): (usize, usize, usize),
        line: usize,
        labels_csv: &Path,
        names: &ProbeNames,
    ) -> Result<bool> {
        match self.0.get(&(image, probe)) {
            None => {
                self.0.insert((image, probe), (label, line));
                Ok(true)
            }
            Some(&(same, _)) if same == label => Ok(false),
            Some(&(other, first_line)) => {
                let (probe_name, labels) = &names[probe];
                Err(Error::field(
                    labels_csv,
                    format!("line {line}: label"),
                    format!(
                        "`{}` contradicts line {first_line}, which gives the same image `{}` for \
                         probe `{probe_name}`",
                        labels[label], labels[other]
                    ),
                ))
            }
        }
    }
}

/// A labels file and the indices of its `image`, `probe` and `label` columns.
fn read_labels(labels_csv: &Path) -> Result<(Table, [usize; 3])> {
    let table = Table::read(labels_csv)?;
    let columns = [
        table.column_index("image")?,
        table.column_index("probe")?,
        table.column_index("label")?,
    ];
    Ok((table, columns))
}

/// The message for an image value that fits several probed images, naming at most 3.
fn ambiguous(name: &str, candidates: &[&Path]) -> String {
    let mut list: Vec<String> = candidates
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    if candidates.len() > 3 {
        list.push(format!("and {} more", candidates.len() - 3));
    }
    format!(
        "`{name}` fits {} probed images ({}); give the image's path as probed",
        candidates.len(),
        list.join(", ")
    )
}

/// Each probe's name and label names, in suite order.
type ProbeNames<'a> = Vec<(&'a str, Vec<&'a str>)>;

/// The probe's index and the label's index within it, or an error naming the file and line.
fn locate(
    names: &ProbeNames,
    labels_csv: &Path,
    line: usize,
    probe: &str,
    label: &str,
) -> Result<(usize, usize)> {
    let Some(p) = names.iter().position(|(name, _)| *name == probe) else {
        let all: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        return Err(Error::field(
            labels_csv,
            format!("line {line}: probe"),
            format!(
                "`{probe}` is not a probe of the suite (probes: {})",
                all.join(", ")
            ),
        ));
    };
    let labels = &names[p].1;
    let Some(t) = labels.iter().position(|l| *l == label) else {
        return Err(Error::field(
            labels_csv,
            format!("line {line}: label"),
            format!(
                "`{label}` is not a label of probe `{probe}` (labels: {})",
                labels.join(", ")
            ),
        ));
    };
    Ok((p, t))
}

/// Checks a labels file against the suite and the images about to be probed, before any is:
/// its columns, every row's probe and label, and that no row's image value fits several
/// images (see [`evaluate`]).
pub fn check_labels(paths: &[std::path::PathBuf], suite: &Suite, labels_csv: &Path) -> Result<()> {
    let names: ProbeNames = suite
        .probes
        .iter()
        .map(|p| (p.name.as_str(), p.labels.iter().map(|l| l.name()).collect()))
        .collect();
    labelled(labels_csv, &names, paths.iter().map(|p| p.as_path()))?;
    Ok(())
}

/// A labels file's rows as (probe index, label index, image index), each image and probe
/// once; rows that name no probed image count in the second value.
type Labelled = (Vec<(usize, usize, usize)>, usize);

/// Reads a labels file against the probe `names` and the probed `images` (see [`evaluate`]).
fn labelled<'p>(
    labels_csv: &Path,
    names: &ProbeNames,
    images: impl Iterator<Item = &'p Path>,
) -> Result<Labelled> {
    let (table, [ci, cp, cl]) = read_labels(labels_csv)?;
    let images = ImageMatcher::new(images, labels_csv);
    let mut given = GivenLabels::default();
    let (mut rows, mut unmatched) = (Vec::new(), 0);
    for (r, row) in table.rows.iter().enumerate() {
        let line = table.lines.get(r).copied().unwrap_or(r + 2);
        // Cells are trimmed, as `agree` trims them: a space after a comma is not a label.
        let (p, t) = locate(names, labels_csv, line, row[cp].trim(), row[cl].trim())?;
        match images.find(row[ci].trim(), line)? {
            None => unmatched += 1,
            Some(i) => {
                if given.first((i, p, t), line, labels_csv, names)? {
                    rows.push((p, t, i));
                }
            }
        }
    }
    Ok((rows, unmatched))
}

/// Reads `image,probe,label` rows and scores the answers. An image is matched by its path as
/// probed, else by a file name or path ending (`cellA/baseline.png`) that only one image has.
/// A label or probe the suite does not have, or an image value that fits several images, is
/// an error naming the file and line.
pub fn evaluate(results: &ProbeResults, labels_csv: &Path, k: usize) -> Result<Evaluation> {
    // Every image has the suite's probes in suite order.
    let names: ProbeNames = results
        .images
        .first()
        .map(|i| {
            i.probes
                .iter()
                .map(|a| {
                    (
                        a.probe.as_str(),
                        a.labels.iter().map(String::as_str).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let (rows, unmatched) = labelled(
        labels_csv,
        &names,
        results.images.iter().map(|i| i.path.as_path()),
    )?;
    let mut scores: BTreeMap<String, Tally> = BTreeMap::new();
    for (p, t, i) in rows {
        let probe = names[p].0;
        let ans = &results.images[i].probes[p];
        let mut order: Vec<usize> = (0..ans.probs.len()).collect();
        order.sort_by(|&a, &b| ans.probs[b].total_cmp(&ans.probs[a]));
        let entry = scores.entry(probe.to_string()).or_insert_with(|| {
            let n = ans.labels.len();
            (ans.labels.clone(), vec![vec![0; n]; n], 0, 0)
        });
        entry.1[t][order[0]] += 1;
        entry.2 += 1;
        if order.iter().take(k).any(|&p| p == t) {
            entry.3 += 1;
        }
    }
    let probes = scores
        .into_iter()
        .map(|(probe, (labels, confusion, n, topk))| {
            let correct: usize = (0..labels.len()).map(|i| confusion[i][i]).sum();
            let recall = labels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let total: usize = confusion[i].iter().sum();
                    (
                        l.clone(),
                        (total > 0).then(|| confusion[i][i] as f64 / total as f64),
                    )
                })
                .collect();
            ProbeScore {
                probe,
                n,
                accuracy: correct as f64 / n as f64,
                k,
                top_k_accuracy: topk as f64 / n as f64,
                recall,
                labels,
                confusion,
            }
        })
        .collect();
    Ok(Evaluation {
        labels_file: labels_csv.display().to_string(),
        probes,
        unmatched_rows: unmatched,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::probe::runner::ImageAnswers;
    use crate::probe::runner::ProbeAnswer;

    const LABELS: [&str; 3] = ["Impressionism", "Cubism", "Baroque"];

    /// Results for images at `paths`, image i answering label `top[i]` with probability 0.8.
    fn results(paths: &[&str], top: &[usize]) -> ProbeResults {
        let images = paths
            .iter()
            .zip(top)
            .map(|(p, &t)| {
                let mut probs = vec![0.1f32; 3];
                probs[t] = 0.8;
                ImageAnswers {
                    path: PathBuf::from(p),
                    sha256: String::new(),
                    probes: vec![ProbeAnswer {
                        probe: "style".into(),
                        labels: LABELS.iter().map(|l| l.to_string()).collect(),
                        probs,
                        top: LABELS[t].into(),
                        entropy: 0.0,
                    }],
                }
            })
            .collect();
        ProbeResults {
            tool: "artguide".into(),
            version: "0".into(),
            clip: "tiny".into(),
            suite: PathBuf::from("suite.yaml"),
            images,
            cached: 0,
            evaluation: None,
            held_out: None,
            agreement: None,
        }
    }

    fn labels_file(dir: &Path, rows: &[(&str, &str)]) -> PathBuf {
        let mut csv = String::from("image,probe,label\n");
        for (image, label) in rows {
            csv.push_str(&format!("{image},style,{label}\n"));
        }
        let p = dir.join("labels.csv");
        std::fs::write(&p, csv).unwrap();
        p
    }

    const CELLS: [&str; 4] = [
        "images/exp/c1/baseline.png",
        "images/exp/c2/baseline.png",
        "images/exp/c3/baseline.png",
        "images/exp/c4/baseline.png",
    ];

    #[test]
    fn a_file_name_several_images_share_is_an_error_naming_the_line() {
        let tmp = tempfile::tempdir().unwrap();
        let r = results(&CELLS, &[0, 1, 2, 0]);
        let lab = labels_file(
            tmp.path(),
            &[
                ("images/exp/c1/baseline.png", "Impressionism"),
                ("baseline.png", "Cubism"),
            ],
        );
        let err = evaluate(&r, &lab, 2).unwrap_err().to_string();
        assert!(
            err.contains("labels.csv")
                && err.contains("line 3")
                && err.contains("`baseline.png`")
                && err.contains("4 probed images")
                && err.contains("path as probed"),
            "{err}"
        );
        // At most 3 candidates are listed.
        assert!(
            err.contains(CELLS[0]) && err.contains(CELLS[2]) && !err.contains(CELLS[3]),
            "{err}"
        );
        assert!(err.contains("and 1 more"), "{err}");

        // A path ending shared by two images is ambiguous too.
        let r = results(
            &[
                "a/cell/baseline.png",
                "b/cell/baseline.png",
                "c/baseline.png",
            ],
            &[0, 1, 2],
        );
        let lab = labels_file(tmp.path(), &[("cell/baseline.png", "Cubism")]);
        let err = evaluate(&r, &lab, 1).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("2 probed images") && !err.contains("more"),
            "{err}"
        );
    }

    #[test]
    fn full_paths_and_unique_names_or_endings_match() {
        let tmp = tempfile::tempdir().unwrap();
        let mut paths = CELLS.to_vec();
        paths.push("images/exp/c1/other.png");
        let r = results(&paths, &[0, 1, 2, 0, 2]);
        let lab = labels_file(
            tmp.path(),
            &[
                // Full paths: every cell scores its own answer.
                (CELLS[0], "Impressionism"),
                (CELLS[2], "Baroque"),
                (CELLS[3], "Cubism"),
                // A unique ending (of CELLS[1]) and a unique file name.
                ("c2/baseline.png", "Cubism"),
                ("other.png", "Baroque"),
                // Not whole components, or not probed: unmatched, not an error.
                ("aseline.png", "Cubism"),
                ("c9/baseline.png", "Cubism"),
                ("", "Cubism"),
            ],
        );
        let ev = evaluate(&r, &lab, 1).unwrap();
        assert_eq!(ev.unmatched_rows, 3);
        let s = &ev.probes[0];
        assert_eq!(s.n, 5);
        // Only c4 (answers Impressionism, labelled Cubism) is wrong.
        assert!((s.accuracy - 4.0 / 5.0).abs() < 1e-12, "{s:?}");
        assert_eq!(
            s.confusion,
            vec![vec![1, 0, 0], vec![1, 1, 0], vec![0, 0, 2]]
        );
    }

    /// A row names an image however its path is spelled: with `./`, through `..` or
    /// absolute (the same file on disk), with spaces around its cells.
    #[test]
    fn spellings_of_a_probed_path_match_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("imgs");
        std::fs::create_dir(&dir).unwrap();
        let (a, b) = (dir.join("a.png"), dir.join("b.png"));
        for p in [&a, &b] {
            std::fs::write(p, p.display().to_string()).unwrap();
        }
        let probed = [a.to_str().unwrap(), b.to_str().unwrap()];
        let r = results(&probed, &[0, 1]);
        let through_dots = tmp.path().join("imgs/../imgs/./a.png");
        let through_dots = through_dots.to_str().unwrap();
        let csv = tmp.path().join("labels.csv");
        std::fs::write(
            &csv,
            format!("image,probe,label\n{through_dots},style,Impressionism\n ./b.png , style , Cubism\n"),
        )
        .unwrap();
        let ev = evaluate(&r, &csv, 1).unwrap();
        assert_eq!(ev.unmatched_rows, 0, "{ev:?}");
        assert_eq!((ev.probes[0].n, ev.probes[0].accuracy), (2, 1.0));
    }

    /// Two rows for one image and probe count once when they agree and are an error naming
    /// both lines when they do not, however the image is spelled.
    #[test]
    fn one_image_labelled_twice_counts_once_or_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let r = results(&CELLS, &[0, 1, 2, 0]);
        let lab = labels_file(
            tmp.path(),
            &[
                (CELLS[0], "Impressionism"),
                ("./images/exp/c1/baseline.png", "Impressionism"),
                (CELLS[1], "Cubism"),
            ],
        );
        let ev = evaluate(&r, &lab, 1).unwrap();
        assert_eq!((ev.probes[0].n, ev.unmatched_rows), (2, 0));
        let lab = labels_file(
            tmp.path(),
            &[
                (CELLS[0], "Impressionism"),
                ("./images/exp/c1/baseline.png", "Cubism"),
            ],
        );
        let err = evaluate(&r, &lab, 1).unwrap_err().to_string();
        assert!(
            err.contains("line 3: label")
                && err.contains("`Cubism` contradicts line 2")
                && err.contains("`Impressionism`"),
            "{err}"
        );
    }

    /// The labels file is checked against the paths before any image is probed.
    #[test]
    fn labels_are_checked_before_probing() {
        let tmp = tempfile::tempdir().unwrap();
        let paths: Vec<std::path::PathBuf> = ["run/a/baseline.png", "run/b/baseline.png"]
            .iter()
            .map(std::path::PathBuf::from)
            .collect();
        let suite = Suite::parse(
            "probes:\n  - name: style\n    templates: [\"a {} painting\"]\n    labels: [X, Y]\n",
            Path::new("suite.yaml"),
        )
        .unwrap();
        let csv = tmp.path().join("labels.csv");
        std::fs::write(&csv, "image,probe,label\na/baseline.png,style,X\n").unwrap();
        check_labels(&paths, &suite, &csv).unwrap();
        std::fs::write(&csv, "image,probe,label\nbaseline.png,style,X\n").unwrap();
        let err = check_labels(&paths, &suite, &csv).unwrap_err().to_string();
        assert!(
            err.contains("line 2: image") && err.contains("fits 2 probed images"),
            "{err}"
        );
        std::fs::write(&csv, "picture,probe,label\nx,style,X\n").unwrap();
        let err = check_labels(&paths, &suite, &csv).unwrap_err().to_string();
        assert!(err.contains("image"), "{err}");
        // A probe or label the suite does not have, on any row, even one no image matches.
        let rows = "image,probe,label\na/baseline.png,style,X\nzz.png,styel,X\n";
        std::fs::write(&csv, rows).unwrap();
        let err = check_labels(&paths, &suite, &csv).unwrap_err().to_string();
        assert!(
            err.contains("line 3: probe")
                && err.contains("`styel`")
                && err.contains("probes: style"),
            "{err}"
        );
        std::fs::write(&csv, "image,probe,label\nzz.png,style,Z\n").unwrap();
        let err = check_labels(&paths, &suite, &csv).unwrap_err().to_string();
        assert!(
            err.contains("line 2: label") && err.contains("labels: X, Y"),
            "{err}"
        );
    }
}
