//! Probe suites: YAML files naming the questions asked of CLIP (style, period, defects, ...)
//! as labels and prompt templates.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// A suite file: a list of probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The probes, asked in this order.
    pub probes: Vec<ProbeSpec>,
    /// Where it was read from (for messages).
    #[serde(skip)]
    pub path: PathBuf,
}

/// One probe: a multi-class (or, with two labels, binary) zero-shot question.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// Unique name, e.g. `style`.
    pub name: String,
    /// Templates with one `{}` where a label's name goes; ensembled per label.
    #[serde(default)]
    pub templates: Vec<String>,
    /// Label names (filled into the templates) or `{name, prompts}` with explicit prompts.
    pub labels: Vec<Label>,
    /// What the probe is about, for reports.
    #[serde(default)]
    pub description: Option<String>,
}

/// A label: a bare name, or a name with its own prompts.
#[derive(Debug, Clone)]
pub enum Label {
    /// Filled into the probe's templates.
    Name(String),
    /// Explicit prompts (the probe's templates are not used for this label).
    Prompts(LabelPrompts),
}

/// A label with explicit prompts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelPrompts {
    pub name: String,
    pub prompts: Vec<String>,
}

// By hand rather than `untagged`: serde's untagged error ("did not match any variant of
// untagged enum Label") hides which key of a label's mapping is wrong.
impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(s) => Ok(Label::Name(s)),
            v @ serde_yaml::Value::Mapping(_) => serde_yaml::from_value(v)
                .map(Label::Prompts)
                .map_err(|e| D::Error::custom(format!("a label's {{name, prompts}}: {e}"))),
            other => Err(D::Error::custom(format!(
                "expected a label name or {{name, prompts}}, found {}",
                match other {
                    serde_yaml::Value::Null => "nothing",
                    serde_yaml::Value::Bool(_) => "true/false",
                    serde_yaml::Value::Number(_) => "a number (quote it to use it as a name)",
                    serde_yaml::Value::Sequence(_) => "a list",
                    _ => "another value",
                }
            ))),
        }
    }
}

impl Label {
    /// The label's name.
    pub fn name(&self) -> &str {
        match self {
            Label::Name(n) => n,
            Label::Prompts(p) => &p.name,
        }
    }
}

impl ProbeSpec {
    /// The prompts of each label, in label order.
    pub fn prompts(&self) -> Vec<Vec<String>> {
        self.labels
            .iter()
            .map(|l| match l {
                Label::Name(n) => self
                    .templates
                    .iter()
                    .map(|t| t.replacen("{}", n, 1))
                    .collect(),
                Label::Prompts(p) => p.prompts.clone(),
            })
            .collect()
    }
}

impl Suite {
    /// Reads and checks a suite file; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::error::read_yaml_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses and checks suite text that came from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut suite: Suite = serde_yaml::from_str(text)
            .map_err(|e| Error::file(path, format!("invalid probe suite: {e}")))?;
        suite.path = path.to_path_buf();
        suite.check()?;
        Ok(suite)
    }

    fn check(&self) -> Result<()> {
        let path = &self.path;
        if self.probes.is_empty() {
            return Err(Error::field(
                path,
                "probes",
                "is empty: expected at least one probe",
            ));
        }
        let mut names = HashSet::new();
        for (i, p) in self.probes.iter().enumerate() {
            let at = |f: &str| format!("probes[{i}] ({}).{f}", p.name);
            if p.name.trim().is_empty() {
                return Err(Error::field(path, format!("probes[{i}].name"), "is empty"));
            }
            if !names.insert(p.name.as_str()) {
                return Err(Error::field(
                    path,
                    at("name"),
                    "is used by an earlier probe",
                ));
            }
            if p.labels.len() < 2 {
                return Err(Error::field(
                    path,
                    at("labels"),
                    format!("has {} label(s): expected at least 2", p.labels.len()),
                ));
            }
            for (j, t) in p.templates.iter().enumerate() {
                if t.matches("{}").count() != 1 {
                    return Err(Error::field(
                        path,
                        at(&format!("templates[{j}]")),
                        format!("`{t}` must contain `{{}}` exactly once"),
                    ));
                }
            }
            let mut labels = HashSet::new();
            for (j, l) in p.labels.iter().enumerate() {
                if l.name().trim().is_empty() {
                    return Err(Error::field(
                        path,
                        at(&format!("labels[{j}]")),
                        "has an empty name",
                    ));
                }
                if !labels.insert(l.name()) {
                    return Err(Error::field(
                        path,
                        at(&format!("labels[{j}]")),
                        format!("`{}` appears twice", l.name()),
                    ));
                }
                match l {
                    Label::Name(_) if p.templates.is_empty() => {
                        return Err(Error::field(path, at("templates"), format!("is empty, so label `{}` has no prompt: add templates or give the label `prompts`", l.name())));
                    }
                    Label::Prompts(lp)
                        if lp.prompts.is_empty()
                            || lp.prompts.iter().any(|s| s.trim().is_empty()) =>
                    {
                        return Err(Error::field(
                            path,
                            at(&format!("labels[{j}].prompts")),
                            "is empty or holds an empty prompt",
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Suite::parse(text, Path::new("s.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_names_and_explicit_prompts() {
        let s = Suite::parse(
            "probes:\n  - name: style\n    templates: [\"a painting in the style of {}\", \"an artwork of the {} movement\"]\n    labels: [Impressionism, Cubism]\n  - name: hands\n    labels:\n      - {name: distorted, prompts: [\"a painting with distorted hands\"]}\n      - {name: fine, prompts: [\"a painting with well-drawn hands\"]}\n",
            Path::new("s.yaml"),
        )
        .unwrap();
        assert_eq!(
            s.probes[0].prompts()[1][1],
            "an artwork of the Cubism movement"
        );
        assert_eq!(
            s.probes[1].prompts()[0],
            ["a painting with distorted hands"]
        );
    }

    #[test]
    fn bad_suites_name_the_problem() {
        let e = err("probes:\n  - name: a\n    templatez: [\"{}\"]\n    labels: [x, y]\n");
        assert!(
            e.contains("s.yaml") && e.contains("templatez") && e.contains("line 3"),
            "{e}"
        );
        let e = err("probes:\n  - name: a\n    templates: [\"a painting\"]\n    labels: [x, y]\n");
        assert!(
            e.contains("probes[0] (a).templates[0]") && e.contains("{}"),
            "{e}"
        );
        let e = err("probes:\n  - name: a\n    templates: [\"{}\"]\n    labels: []\n");
        assert!(e.contains("labels") && e.contains("at least 2"), "{e}");
        let e = err("probes:\n  - name: a\n    templates: [\"{}\"]\n    labels: [x, x]\n");
        assert!(e.contains("appears twice"), "{e}");
        let e = err("probes: []\n");
        assert!(e.contains("probes") && e.contains("empty"), "{e}");
        // A wrong key inside a label's mapping is named (not "no variant of untagged enum").
        let e =
            err("probes:\n  - name: a\n    labels:\n      - {name: x, promts: [p]}\n      - y\n");
        assert!(
            e.contains("unknown field `promts`") && e.contains("line 4"),
            "{e}"
        );
        let e = err("probes:\n  - name: a\n    templates: [\"{}\"]\n    labels: [x, 1800]\n");
        assert!(e.contains("found a number (quote it"), "{e}");
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn shipped_art_suite_is_valid_and_covers_the_study() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/art.yaml");
        let s = Suite::load(&path).unwrap();
        let names: Vec<&str> = s.probes.iter().map(|p| p.name.as_str()).collect();
        for n in [
            "content", "scene", "style", "period", "hands", "faces", "text", "origin",
        ] {
            assert!(names.contains(&n), "missing probe {n}");
        }
        let style = &s.probes[names.iter().position(|n| *n == "style").unwrap()];
        assert!(style.labels.len() >= 20);
    }
}
