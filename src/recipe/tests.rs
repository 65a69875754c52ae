use super::*;

fn parse(text: &str) -> Result<LoadedRecipe> {
    // Paths resolve against the repo's recipes/smoke folder, where the fixtures are reachable.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/smoke/unit.yaml");
    LoadedRecipe::parse(text, &path)
}

const BASE: &str = "name: t\nmodel: ../../tests/fixtures/tiny-sd-a\nprobe_clip: ../../tests/fixtures/clip/tiny-clip-b\nsuite: ../../probes/art.yaml\nexperiments:\n  - name: e\n    subjects: [a, b]\n    seeds: {start: 5, count: 2}\n";

#[test]
fn defaults_are_stated_once_and_applied() {
    let r = parse(BASE).unwrap();
    assert_eq!(r.recipe.generation, Generation::default());
    let e = &r.recipe.experiments[0];
    assert_eq!(e.prompt, "{subject}");
    assert_eq!(e.arms.len(), 1);
    assert!(e.arms[0].guidance.is_none());
    assert_eq!(e.seeds.values(), vec![5, 6]);
}

#[test]
fn plan_is_the_grid_in_order_with_shared_cells() {
    let text = BASE.replace(
        "    seeds: {start: 5, count: 2}\n",
        "    prompt: \"{subject} as {target}\"\n    target_grid:\n      text: \"{style} from the {period}\"\n      labels: {style: [Baroque, Cubism], period: [17th]}\n    seeds: [1, 2]\n    arms:\n      - name: base\n      - name: g\n        guidance: {prompts: [{text: \"{target}\"}], clip: ../../tests/fixtures/clip/tiny-clip-a, decoder: linear}\n",
    );
    let r = parse(&text).unwrap();
    let suite = crate::probe::suite::Suite::load(&r.resolve(&r.recipe.suite)).unwrap();
    let plan = Plan::new(&r, &suite).unwrap();
    // 2 subjects x 2 targets x 2 seeds x 2 arms.
    assert_eq!(plan.items.len(), 16);
    let first = &plan.items[0];
    assert_eq!(first.id, "e/s00-t00-seed1/base");
    assert_eq!(first.prompt, "a as Baroque from the 17th");
    let guided = &plan.items[1];
    assert_eq!(guided.cell, first.cell);
    assert_eq!(guided.seed, first.seed);
    let g = guided.guidance.as_ref().unwrap();
    assert_eq!(g.prompts[0].text, "Baroque from the 17th");
    assert!(g.clip.as_ref().unwrap().ends_with("tiny-clip-a"));
    assert_eq!(plan.items[4].prompt, "a as Cubism from the 17th");
    // Shards partition the plan.
    let mut ids: Vec<&str> = plan
        .shard(0, 3)
        .iter()
        .chain(&plan.shard(1, 3))
        .chain(&plan.shard(2, 3))
        .map(|i| i.id.as_str())
        .collect();
    ids.sort();
    let mut all: Vec<&str> = plan.items.iter().map(|i| i.id.as_str()).collect();
    all.sort();
    assert_eq!(ids, all);
    // Shards hold whole cells: with two arms and two shards, each shard pairs its guided
    // images with their baselines (by item index, one shard would get every baseline).
    for i in 0..2 {
        let shard = plan.shard(i, 2);
        assert_eq!(shard.len(), 8);
        assert_eq!(shard.iter().filter(|it| it.baseline).count(), 4);
        for it in &shard {
            assert!(shard
                .iter()
                .any(|o| o.cell == it.cell && o.baseline != it.baseline));
        }
    }
}

#[test]
fn errors_name_location_and_field() {
    let cases = [
        (
            BASE.replace("name: t\n", "name: t\ncolour: red\n"),
            "unknown field `colour`",
        ),
        (
            BASE.replace("seeds: {start: 5, count: 2}", "seeds: []"),
            "seeds",
        ),
        (BASE.replace("subjects: [a, b]", "subjects: []"), "subjects"),
        (
            BASE.replace("name: t\n", "name: .hidden\n"),
            "plain folder name",
        ),
        (
            format!("{BASE}generation: {{steps: 0}}\n"),
            "generation.steps",
        ),
        (
            format!("{BASE}generation: {{scheduler: plms}}\n"),
            "generation.scheduler",
        ),
        (
            BASE.replace(
                "model: ../../tests/fixtures/tiny-sd-a",
                "model: ./missing-model",
            ),
            "model",
        ),
    ];
    for (text, needle) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(needle), "`{needle}` missing from: {e}");
        assert!(e.contains("unit.yaml"), "file not named: {e}");
    }
    let e = parse(&BASE.replace("name: t\n", "name: t\ncolour: red\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unit.yaml:2:1"), "no line:column: {e}");
}

/// Plans that would mislead a study are refused at load, naming the field: repeated cells
/// (counted as independent pairs), placeholders nothing fills, an arm that guides toward
/// nothing, and seed ranges too large to list.
#[test]
fn misleading_plans_are_refused() {
    let exp = "experiments[0] (e)";
    let with_arms = |arms: &str| format!("{BASE}    arms:\n{arms}");
    let cases = [
        (
            BASE.replace("subjects: [a, b]", "subjects: [a, a]"),
            format!("{exp}.subjects: has `a` twice"),
        ),
        (
            format!("{BASE}    targets:\n      - {{text: x, labels: {{style: Cubism}}}}\n      - {{text: x, labels: {{style: Cubism}}}}\n"),
            format!("{exp}.targets: has `x` twice"),
        ),
        (
            format!("{BASE}    target_grid: {{text: \"{{style}}\", labels: {{style: [Baroque, Baroque]}}}}\n"),
            format!("{exp}.target_grid.labels.style: has `Baroque` twice"),
        ),
        (
            format!("{BASE}    target_grid: {{text: \"{{stlye}}\", labels: {{style: [Baroque]}}}}\n"),
            format!("{exp}.target_grid.text: {{stlye}} is not a probe"),
        ),
        (
            format!("{BASE}    prompt: \"{{subject}} in {{target}}\"\n"),
            format!("{exp}.prompt: uses {{target}}, but the experiment has no targets"),
        ),
        (
            format!("{BASE}    prompt: \"{{subjct}}\"\n"),
            format!("{exp}.prompt: unknown placeholder {{subjct}}"),
        ),
        (
            with_arms("      - {name: base}\n      - {name: g, guidance: {prompts: [{text: \"{target}\"}]}}\n"),
            format!("{exp}.arms[1].guidance.prompts[0]: uses {{target}}"),
        ),
        (
            with_arms("      - {name: base}\n      - {name: g, guidance: {scale: 300, cutouts: 2}}\n"),
            "arms[1] (g).guidance: guides toward nothing".to_string(),
        ),
        (
            BASE.replace("count: 2", "count: 10000000000000"),
            format!("{exp}.seeds.count: 10000000000000: at most"),
        ),
        (
            BASE.replace("start: 5, count: 2", "start: 18446744073709551615, count: 2"),
            format!("{exp}.seeds: start 18446744073709551615 + count 2 passes the largest seed"),
        ),
    ];
    for (text, needle) in cases {
        let e = parse(&text).unwrap_err().to_string();
        // "FIELD: message" is written "field `FIELD`: message".
        let (field, message) = needle.split_once(": ").unwrap();
        assert!(
            e.contains(&format!("{field}`: {message}")),
            "`{needle}` missing from: {e}"
        );
        assert!(e.contains("unit.yaml"), "file not named: {e}");
    }
    // The largest seed itself is fine, and so are filled placeholders.
    parse(&BASE.replace(
        "start: 5, count: 2",
        "start: 18446744073709551614, count: 2",
    ))
    .unwrap();
    parse(&format!("{BASE}    prompt: \"{{subject}}, oil\"\n")).unwrap();
}
