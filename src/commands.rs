//! What each subcommand does, between parsed arguments and the library: the command-line
//! edge, where errors gain context for the user.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::cli::{
    AgreeArgs, BenchArgs, Cli, Command, DeviceArg, DtypeArg, EmbedArgs, GenerateArgs, GuidanceArgs,
    OnErrorArg, ProbeArgs, RunArgs, SeparateArgs,
};
use crate::generate::{self, GenerateOptions, Generated};
use crate::guidance::{GuidanceConfig, Guide, OnNonFinite, StyleConfig, TextTarget};
use crate::models::hub::HubOptions;
use crate::models::stable_diffusion::{LoadOptions, RandomArch, SdModel};
use crate::output::{self, OutputSet};
use crate::progress::{count, Progress, ProgressMode};
use crate::schedulers::SchedulerChoice;

/// `println!` for a command's result on stdout that returns the write error instead of
/// panicking, so a reader that stops early (`| head`) ends the command quietly (see
/// [`is_broken_pipe`]).
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let mode = if cli.quiet {
        ProgressMode::Quiet
    } else if cli.json {
        ProgressMode::Json
    } else {
        ProgressMode::Bar
    };
    match cli.command {
        Command::Generate(args) => run_generate(&args, mode),
        Command::Inspect { image } if mode == ProgressMode::Json => {
            out!("{}", output::inspect_json(&image)?);
            Ok(())
        }
        Command::Inspect { image } => {
            write!(std::io::stdout(), "{}", output::inspect(&image)?)?;
            Ok(())
        }
        Command::Bench(args) => run_bench(&args, mode),
        Command::Separate(args) => run_separate(&args, mode),
        Command::Agree(args) => run_agree(&args, mode),
        Command::Embed(args) => run_embed(&args, mode),
        Command::Probe(args) => run_probe(&args, mode),
        Command::Run(args) => run_recipe(&args, mode).map(|_| ()),
        Command::Probeset(args) => {
            let Some(out) = run_recipe(&args, mode)? else {
                return Ok(());
            };
            if args.shard.is_some() {
                Progress::new(mode, 0, "").event(
                    "shard done; after `artguide merge`, run `artguide probeset RECIPE --out MERGED_DIR` (it finds every image done) to write the annotation sheet",
                    serde_json::json!({"event": "shard-done"}),
                );
                return Ok(());
            }
            let results = crate::run::results::RunResults::load(&out)?;
            let files = crate::probeset::write(&out, &results)?;
            Progress::new(mode, 0, "").event(
                &format!(
                    "probe set of {}: {}",
                    count(results.items.len(), "image"),
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                serde_json::json!({"event": "probeset", "images": results.items.len(), "files": paths_json(&files)}),
            );
            Ok(())
        }
        Command::Merge(args) => run_merge(&args, mode),
        Command::Compare(args) => run_compare(&args, mode),
    }
}

/// Runs (or with --dry-run, plans) a recipe; returns the run folder when it ran.
fn run_recipe(args: &crate::cli::RecipeArgs, mode: ProgressMode) -> Result<Option<PathBuf>> {
    use crate::recipe::{LoadedRecipe, Plan};
    let recipe = LoadedRecipe::load(&args.recipe)?;
    let suite = crate::probe::suite::Suite::load(&recipe.resolve(&recipe.recipe.suite))?;
    let plan = Plan::new(&recipe, &suite)?;
    let shard = args.shard;
    let shard_items: Vec<&crate::recipe::PlanItem> = match shard {
        Some((i, n)) => plan.shard(i, n),
        None => plan.items.iter().collect(),
    };
    let items = shard_items.len();
    // What each image really runs (fewer than `steps` for img2img).
    let steps = recipe.recipe.generation.denoising_steps()?;
    let guided = shard_items
        .iter()
        .filter(|i| i.guidance.as_ref().is_some_and(|g| g.is_active()))
        .count();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("outputs").join(&recipe.recipe.name));
    if args.dry_run {
        let opts = load_options(&args.run)?;
        // The estimate needs the model; a plan is still worth printing without it, but a
        // setting the model refuses (a size it cannot make) fails the real run too.
        let estimate = match crate::run::estimate(&recipe, &shard_items, &opts, args.max_pixels) {
            Ok(est) => Ok(est),
            Err(e @ crate::Error::Field { .. }) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        };
        let experiments = recipe.recipe.experiments.len();
        if mode == ProgressMode::Json {
            let mut summary = serde_json::json!({"event": "plan", "recipe": recipe.recipe.name,
                "experiments": experiments, "images": items, "guided_images": guided,
                "steps_per_image": steps, "unet_steps": items * steps, "out": out.display().to_string()});
            summary["estimate"] = match &estimate {
                Ok(est) => serde_json::to_value(est)?,
                Err(e) => serde_json::json!({"unavailable": e}),
            };
            out!("{summary}");
            return Ok(None);
        }
        let g = &recipe.recipe.generation;
        let each = match g.init_image {
            Some(_) => format!("{steps} of {} steps each (img2img)", g.steps),
            None => format!("{steps} steps each"),
        };
        out!(
            "{}: {experiments} experiments, {items} images ({guided} guided), {each} = {} UNet steps -> {}",
            recipe.recipe.name,
            items * steps,
            out.display()
        );
        for e in &recipe.recipe.experiments {
            let n = shard_items
                .iter()
                .filter(|i| i.experiment == e.name)
                .count();
            out!(
                "  {}: {}, arms: {}",
                e.name,
                count(n, "image"),
                e.arms
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        match estimate {
            Ok(est) => out!(
                "estimated time: {:.1} min ({} steps x {:.2} s measured{})",
                est.total_s / 60.0,
                est.steps,
                est.step_s,
                est.guidance_s
                    .map(|g| format!(
                        ", plus {} guided steps x {g:.2} s of guidance",
                        est.guided_steps
                    ))
                    .unwrap_or_default()
            ),
            Err(e) => out!("estimated time: unavailable ({e})"),
        }
        return Ok(None);
    }
    let opts = load_options(&args.run)?;
    let progress = Progress::new(mode, (items * steps) as u64, "running");
    let run_opts = crate::run::RunOptions {
        out: out.clone(),
        shard,
        force: args.force,
        max_pixels: args.max_pixels,
    };
    let mut made = 0;
    let mut skipped = 0;
    let results = crate::run::execute(&recipe, &plan, &suite, &opts, &run_opts, &progress, |item, status| {
        match status {
            crate::run::ItemStatus::Made => made += 1,
            crate::run::ItemStatus::Skipped => skipped += 1,
        }
        progress.event(
            &format!("{:?} {}", status, item.id),
            serde_json::json!({"event": "item", "id": item.id, "status": format!("{status:?}").to_lowercase(),
                               "image": out.join(crate::run::image_rel(&item.id)).display().to_string()}),
        );
    })
    .map_err(|e| {
        // The resume advice only where the folder holds this recipe's run: errors found
        // before it was claimed (bad settings, a folder of another run) wrote nothing.
        let started = std::fs::read_to_string(out.join(crate::run::RECIPE_FILE))
            .is_ok_and(|t| recipe.is_copy(&t));
        match e {
            e if !started => anyhow::Error::new(e),
            // The folder's run is not this one's to finish: resuming would not help.
            e @ crate::Error::NotResumable { .. } => anyhow::Error::new(e),
            crate::Error::Interrupted => anyhow::Error::new(WithAdvice {
                cause: e,
                advice: format!(
                    "finished images are kept in {}: run the same command to resume",
                    out.display()
                ),
            }),
            e => anyhow::Error::new(WithAdvice {
                cause: e,
                advice: format!(
                    "run stopped; finished images are kept in {}: fix the cause and run the \
                     same command to resume",
                    out.display()
                ),
            }),
        }
    })?;
    progress.finish();
    // The folder's results hold every finished item in it, also those another --shard made
    // there: counted apart, so the figures add up.
    let others = results.items.len().saturating_sub(made + skipped);
    let from_others = match others {
        0 => String::new(),
        n => format!(", {n} made by other shards in this folder"),
    };
    progress.event(
        &format!(
            "{}: {} ({made} made, {skipped} already done{from_others}) -> {}",
            recipe.recipe.name,
            count(results.items.len(), "image"),
            out.join(crate::run::results::RESULTS_FILE).display()
        ),
        serde_json::json!({"event": "done", "images": results.items.len(), "made": made, "skipped": skipped,
                           "other_shards": others, "out": out.display().to_string()}),
    );
    Ok(Some(out))
}

fn run_compare(args: &crate::cli::CompareArgs, mode: ProgressMode) -> Result<()> {
    use crate::compare::{compare, write_outputs, CompareOptions, Loaded};
    let loaded = Loaded::load(&args.runs)?;
    let opts = CompareOptions {
        resamples: args.resamples,
        seed: args.seed,
        ..Default::default()
    };
    let summary = compare(&loaded, &opts)?;
    let out = args.out.clone().unwrap_or_else(|| args.runs[0].clone());
    let files = write_outputs(&loaded, &summary, &out)?;
    if mode == ProgressMode::Json {
        out!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    if summary.unpaired > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "warning: {} guided images have no baseline in their cell among these runs and are \
             not compared; give the run folders that hold their baselines too",
            summary.unpaired
        );
    }
    // The table is the result: printed with --quiet too (only the file list is progress).
    if !summary.rows.iter().any(|r| r.targeted) {
        // Without targets there is no intended shift to measure; how far each probe's
        // answers moved is still the result (the shift table would be headers only).
        out!(
            "no guided image has a target label (the experiments give no `targets`): how far the \
             answers moved from their baselines"
        );
        out!("| experiment | arm | probe | judge | n | mean KL (nats) | top label changed |");
        out!("| --- | --- | --- | --- | --- | --- | --- |");
        for r in &summary.rows {
            out!(
                "| {} | {} | {} | {} | {} | {:.4} | {:.2} |",
                r.experiment,
                r.arm,
                r.probe,
                r.role,
                r.n,
                r.mean_kl,
                r.top_change_rate
            );
        }
    } else {
        print_shift_table(&summary)?;
    }
    if mode == ProgressMode::Bar {
        for f in files {
            let _ = writeln!(std::io::stderr(), "wrote {}", f.display());
        }
    }
    Ok(())
}

/// compare's main table: each targeted row's shift toward the target, with its statistics.
fn print_shift_table(summary: &crate::compare::Summary) -> Result<()> {
    out!(
        "| experiment | arm | probe | judge | n | mean shift [{:.0}% CI] | flip | Wilcoxon p | Holm p | r |",
        summary.level * 100.0
    );
    out!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in summary.rows.iter().filter(|r| r.targeted) {
        out!(
            "| {} | {} | {} | {} | {} | {:+.4} [{:+.4}, {:+.4}] | {:.2} | {:.4} | {:.4} | {:+.2} |",
            r.experiment,
            r.arm,
            r.probe,
            r.role,
            r.n,
            r.mean_shift.unwrap_or(f64::NAN),
            r.ci_low.unwrap_or(f64::NAN),
            r.ci_high.unwrap_or(f64::NAN),
            r.flip_rate.unwrap_or(f64::NAN),
            r.wilcoxon_p.unwrap_or(f64::NAN),
            r.wilcoxon_p_holm.unwrap_or(f64::NAN),
            r.rank_biserial.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

fn run_merge(args: &crate::cli::MergeArgs, mode: ProgressMode) -> Result<()> {
    use crate::recipe::{LoadedRecipe, Plan};
    let recipe = LoadedRecipe::load(&args.recipe)?;
    let suite = crate::probe::suite::Suite::load(&recipe.resolve(&recipe.recipe.suite))?;
    let plan = Plan::new(&recipe, &suite)?;
    let results = crate::run::merge(&recipe, &plan, &suite, &args.shards, &args.out, args.force)?;
    Progress::new(mode, 0, "").event(
        &format!("merged {}: {} -> {}", count(args.shards.len(), "shard"), count(results.items.len(), "image"), args.out.display()),
        serde_json::json!({"event": "merged", "shards": args.shards.len(), "images": results.items.len(), "out": args.out.display().to_string()}),
    );
    Ok(())
}

/// The files of the named models already on disk, inputs that no output may overwrite. A
/// spec that names no model yet is left to the model loading to report.
fn model_files<'a>(
    specs: impl IntoIterator<Item = &'a String>,
    hub: &crate::models::hub::HubOptions,
) -> Vec<PathBuf> {
    specs
        .into_iter()
        .filter_map(|s| crate::models::hub::ModelRepo::open(s, hub).ok())
        .flat_map(|r| r.files_on_disk())
        .collect()
}

fn run_probe(args: &ProbeArgs, mode: ProgressMode) -> Result<()> {
    use crate::probe::embed::{self, ClipEncoder, OnError};
    use crate::probe::runner::{self, EmbeddingCache};
    check_at_least_one("--batch", args.batch)?;
    check_at_least_one("--top-k", args.top_k)?;
    let suite = crate::probe::suite::Suite::load(&args.suite)?;
    let paths = embed::collect_images(&args.images)?;
    if let Some(labels) = &args.labels {
        // Before the long part: a bad labels file should not cost a probing pass.
        crate::probe::evaluate::check_labels(&paths, &suite, labels)?;
    }
    let outputs: Vec<(&str, &Path)> = [("--out", &args.out), ("--csv", &args.csv)]
        .into_iter()
        .filter_map(|(flag, p)| Some((flag, p.as_deref()?)))
        .collect();
    let opts = load_options(&args.run)?;
    let model_files = model_files(
        std::iter::once(&args.clip).chain(args.probe_clip.as_ref()),
        &opts.hub,
    );
    let inputs: Vec<&Path> = paths
        .iter()
        .map(PathBuf::as_path)
        .chain([args.suite.as_path()])
        .chain(args.labels.as_deref())
        .chain(model_files.iter().map(PathBuf::as_path))
        .collect();
    output::prepare_output_files(&outputs, &inputs)?;
    let cache_root = args
        .cache
        .clone()
        .unwrap_or_else(EmbeddingCache::default_root);
    let on_error = match args.on_error {
        OnErrorArg::Fail => OnError::Fail,
        OnErrorArg::Skip => OnError::Skip,
    };
    let models: Vec<&String> = std::iter::once(&args.clip)
        .chain(args.probe_clip.as_ref())
        .collect();
    // Every model loads before any probes: a bad --probe-clip should not cost a pass of
    // the first model over every image.
    let encoders = models
        .into_iter()
        .map(|spec| ClipEncoder::load(spec, &opts.hub, opts.dtype, &opts.device))
        .collect::<crate::Result<Vec<_>>>()?;
    let progress = Progress::new(mode, (paths.len() * encoders.len()) as u64, "probing");
    let mut all = Vec::new();
    for enc in encoders {
        let cache = match args.no_cache {
            true => None,
            false => Some(EmbeddingCache::new(&cache_root, enc.fingerprint()?)),
        };
        all.push(runner::probe_images(
            &enc,
            &suite,
            &paths,
            args.batch,
            args.max_pixels,
            on_error,
            cache.as_ref(),
            &progress,
        )?);
    }
    let mut all = all.into_iter();
    let mut results = all.next().expect("--clip is always probed");
    if let Some(held_out) = all.next() {
        results = results.with_held_out(held_out);
        for a in results.agreement.iter().flatten() {
            progress.event(
                &format!(
                    "{}: held-out CLIP agrees on the top label for {:.1}% of {} (mean |dp| {:.3})",
                    a.probe,
                    a.top_agreement * 100.0,
                    count(a.images, "image"),
                    a.mean_abs_prob_diff
                ),
                serde_json::json!({"event": "agreement", "probe": a.probe, "images": a.images,
                                   "top_agreement": a.top_agreement,
                                   "mean_abs_prob_diff": a.mean_abs_prob_diff}),
            );
        }
    }
    progress.finish();
    if let Some(labels) = &args.labels {
        let ev = crate::probe::evaluate::evaluate(&results, labels, args.top_k)?;
        for p in &ev.probes {
            progress.event(
                &format!(
                    "{}: n {}, accuracy {:.3}, top-{} {:.3}",
                    p.probe, p.n, p.accuracy, p.k, p.top_k_accuracy
                ),
                serde_json::json!({"event": "score", "probe": p.probe, "n": p.n,
                                   "accuracy": p.accuracy, "top_k_accuracy": p.top_k_accuracy}),
            );
        }
        if ev.unmatched_rows > 0 {
            progress.warn(
                &format!("{} label rows matched no probed image", ev.unmatched_rows),
                serde_json::json!({"event": "unmatched", "rows": ev.unmatched_rows}),
            );
        }
        results.evaluation = Some(ev);
    }
    // One line for --json, so stdout stays JSON lines; indented for a person otherwise.
    let json = if mode == ProgressMode::Json && args.out.is_none() {
        // Spliced as text: a serde_json::Value would print the f32 values with f64 digits.
        format!(
            r#"{{"event":"results","results":{}}}"#,
            serde_json::to_string(&results)?
        )
    } else {
        serde_json::to_string_pretty(&results)?
    };
    if let Some(csv) = &args.csv {
        let (header, rows) = results.csv_table();
        crate::probe::table::write_csv(csv, &header, &rows)?;
    }
    match &args.out {
        Some(p) => {
            output::write_atomic(p, json.as_bytes(), true)?;
            progress.event(
                &format!("probed {} ({} from cache) -> {}", count(results.images.len(), "image"), results.cached, p.display()),
                serde_json::json!({"event": "done", "out": p.display().to_string(), "images": results.images.len(), "cached": results.cached}),
            );
        }
        None => out!("{json}"),
    }
    Ok(())
}

fn run_embed(args: &EmbedArgs, mode: ProgressMode) -> Result<()> {
    use crate::probe::embed::{self, ClipEncoder, OnError};
    check_at_least_one("--batch", args.batch)?;
    let opts = load_options(&args.run)?;
    let paths = embed::collect_images(&args.images)?;
    let list = match &args.list {
        Some(l) => l.clone(),
        None if args.out.extension().is_some_and(|e| e == "csv") => {
            return Err(crate::Error::value(
                "--out",
                format!(
                    "{}: the row list goes to the --out path with .csv by default, which is \
                     this path; give --out a .npy name or --list another path",
                    args.out.display()
                ),
            )
            .into())
        }
        None => args.out.with_extension("csv"),
    };
    let model_files = model_files([&args.clip], &opts.hub);
    let inputs: Vec<&Path> = paths
        .iter()
        .chain(&model_files)
        .map(PathBuf::as_path)
        .collect();
    output::prepare_output_files(&[("--out", &args.out), ("--list", &list)], &inputs)?;
    let enc = ClipEncoder::load(&args.clip, &opts.hub, opts.dtype, &opts.device)?;
    let progress = Progress::new(mode, paths.len() as u64, "embedding");
    let on_error = match args.on_error {
        OnErrorArg::Fail => OnError::Fail,
        OnErrorArg::Skip => OnError::Skip,
    };
    let (m, kept) = embed::embed_images(
        &enc,
        &paths,
        args.batch,
        args.max_pixels,
        on_error,
        &progress,
    )?;
    progress.finish();
    let rows: Vec<Vec<String>> = kept
        .iter()
        .enumerate()
        .map(|(i, p)| vec![i.to_string(), p.display().to_string()])
        .collect();
    crate::probe::npy::write_npy(&args.out, &m)?;
    crate::probe::table::write_csv(&list, &["row", "path"], &rows)?;
    progress.event(
        &format!("wrote {} ({} x {}) and {}", args.out.display(), m.rows, m.cols, list.display()),
        serde_json::json!({"event": "done", "npy": args.out.display().to_string(), "list": list.display().to_string(), "rows": m.rows, "dims": m.cols, "clip": enc.id}),
    );
    Ok(())
}

fn run_separate(args: &SeparateArgs, mode: ProgressMode) -> Result<()> {
    let mut opts = crate::probe::linear::SeparateOptions {
        folds: args.folds,
        seed: args.seed,
        ..Default::default()
    };
    opts.logistic.c = args.c;
    // Two classes from one file separate nothing (a typo, not a null test: shuffle a file's
    // rows for that), and one name for both makes the scores file unreadable.
    let same_bytes = || -> crate::Result<bool> {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        Ok(len(&args.class_a).is_some()
            && len(&args.class_a) == len(&args.class_b)
            && output::sha256_file(&args.class_a)? == output::sha256_file(&args.class_b)?)
    };
    if output::file_identity(&args.class_a) == output::file_identity(&args.class_b) || same_bytes()?
    {
        anyhow::bail!(
            "--class-b {}: holds the same embeddings as --class-a (the same file, or a copy); give \
             the embeddings of the other class",
            args.class_b.display()
        );
    }
    if args.label_a == args.label_b {
        anyhow::bail!(
            "--label-b `{}`: is also --label-a's; the scores file names each row's class by it",
            args.label_b
        );
    }
    if let Some(path) = &args.scores {
        output::prepare_output_files(&[("--scores", path)], &[&args.class_a, &args.class_b])?;
    }
    let sep = crate::probe::linear::separate_files(&args.class_a, &args.class_b, &opts)?;
    if let Some(path) = &args.scores {
        sep.write_scores_csv(path, &args.label_a, &args.label_b)?;
    }
    if mode == ProgressMode::Json {
        out!("{}", serde_json::to_string(&sep)?);
    } else {
        out!(
            "{} ({}) vs {} ({}), {} dims, {}-fold CV, seed {}",
            args.class_a.display(),
            sep.n_a,
            args.class_b.display(),
            sep.n_b,
            sep.dims,
            sep.folds,
            args.seed
        );
        out!(
            "accuracy {:.4} ± {:.4} (std over folds)",
            sep.accuracy,
            sep.accuracy_std
        );
        out!("AUC {:.4} (pooled out-of-fold)", sep.auc);
    }
    Ok(())
}

fn run_agree(args: &AgreeArgs, mode: ProgressMode) -> Result<()> {
    let mut opts = crate::probe::agree::AgreeOptions::new(&args.score_column, &args.rating_column);
    opts.key = args.key.clone();
    opts.resamples = args.resamples;
    opts.seed = args.seed;
    opts.rater_column = args.rater_column.clone();
    if let Some(f) = &args.filter {
        let (col, val) = f
            .split_once('=')
            .with_context(|| format!("--where `{f}`: expected COLUMN=VALUE"))?;
        opts.filter = Some((col.to_string(), val.to_string()));
    }
    if args.nominal {
        return print_label_agreement(
            &crate::probe::agree::agree_label_files(&args.scores, &args.ratings, &opts)?,
            mode,
        );
    }
    let a = crate::probe::agree::agree_raters(&args.scores, &args.ratings, &opts)?;
    if mode == ProgressMode::Json {
        out!("{}", serde_json::to_string(&a)?);
    } else {
        let c = &a.correlations;
        out!("{}", a.matching.summary(c.n));
        for (name, r) in [
            ("Spearman", &c.spearman),
            ("Kendall tau-b", &c.kendall),
            ("Pearson", &c.pearson),
        ] {
            out!(
                "{name:<14} {:+.4}  [{:+.4}, {:+.4}] ({:.0}% bootstrap, {} resamples)",
                r.estimate,
                r.ci_low,
                r.ci_high,
                c.level * 100.0,
                c.resamples
            );
        }
        if let Some(r) = &a.raters {
            out!(
                "{} raters (the rating is their mean): Krippendorff's alpha (interval) {:+.4} over {} rows rated twice or more",
                r.raters.len(),
                r.krippendorff_alpha,
                r.units
            );
            out!("Spearman with the mean of the other raters, of each rater and of the score:");
            for s in &r.raters {
                out!(
                    "  {:+.4} rater, {:+.4} score  (n = {}) {}",
                    s.loo_spearman,
                    s.score_spearman,
                    s.n,
                    s.file
                );
            }
            out!(
                "  {:+.4} rater, {:+.4} score  mean",
                r.mean_loo_spearman,
                r.mean_score_spearman
            );
        }
    }
    Ok(())
}

fn print_label_agreement(
    a: &crate::probe::agree::LabelAgreement,
    mode: ProgressMode,
) -> Result<()> {
    if mode == ProgressMode::Json {
        out!("{}", serde_json::to_string(a)?);
        return Ok(());
    }
    out!("{}", a.matching.summary(a.n));
    out!(
        "same label    {:.4}  [{:.4}, {:.4}] ({:.0}% bootstrap, {} resamples)",
        a.agreement.estimate,
        a.agreement.ci_low,
        a.agreement.ci_high,
        a.level * 100.0,
        a.resamples
    );
    if let Some(alpha) = a.krippendorff_alpha {
        out!(
            "{} raters: Krippendorff's alpha (nominal) {alpha:+.4}",
            a.raters.len()
        );
    }
    for r in &a.raters {
        out!(
            "  {:.4} same label, kappa {:+.4} (n = {}) {}",
            r.agreement,
            r.cohen_kappa,
            r.n,
            r.file
        );
        if a.raters.len() > 1 {
            out!(
                "    with the other raters' labels: {:.4} rater, {:.4} score (n = {})",
                r.rater_vs_others,
                r.score_vs_others,
                r.n_others
            );
        }
    }
    if !a.confusions.is_empty() {
        out!(
            "most frequent disagreements ({} -> {}):",
            a.matching.score_column,
            a.matching.rating_column
        );
        for (s, r, c) in &a.confusions {
            out!("  {c:>5}  {s} -> {r}");
        }
    }
    Ok(())
}

/// The device a `--device` flag names; CUDA needs a binary built with `--features cuda`.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            // Checked first, so a typo is named whatever else is wrong.
            crate::kernels::cuda_kernels_switch()?;
            let tuned = crate::memory::cuda_tuning_switch()?;
            crate::models::unet_graph::cuda_graphs_switch()?;
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "--device cuda: this binary was built without CUDA support (rebuild with `cargo build --release --features cuda`)"
                );
            }
            let device = Device::new_cuda(0).context("--device cuda: cannot open CUDA device 0")?;
            #[cfg(feature = "cuda")]
            if tuned {
                crate::memory::tune_cuda_device(&device)?;
            }
            #[cfg(not(feature = "cuda"))]
            let _ = tuned;
            Ok(device)
        }
    }
}

/// The dtype a `--dtype` flag names; defaults to f32 on CPU and f16 on CUDA. bf16 is refused
/// on the CPU up front: candle's CPU matrix product has no bf16 kernel, so it would fail only
/// after the model loads.
pub fn dtype(arg: Option<DtypeArg>, device: &Device) -> Result<DType> {
    Ok(match arg {
        Some(DtypeArg::F32) => DType::F32,
        Some(DtypeArg::F16) => DType::F16,
        Some(DtypeArg::Bf16) if device.is_cpu() => {
            anyhow::bail!("--dtype bf16: not supported on the CPU; use f32 or f16 there, or bf16 with --device cuda")
        }
        Some(DtypeArg::Bf16) => DType::BF16,
        None if device.is_cuda() => DType::F16,
        None => DType::F32,
    })
}

fn load_options(run: &RunArgs) -> Result<LoadOptions> {
    let device = device(run.device)?;
    let dtype = dtype(run.dtype, &device)?;
    Ok(LoadOptions {
        device,
        dtype,
        hub: HubOptions::from_env(),
    })
}

fn run_generate(args: &GenerateArgs, mode: ProgressMode) -> Result<()> {
    let scheduler: SchedulerChoice = args.scheduler.parse()?;
    let opts = load_options(&args.run)?;
    // Read every input before loading the model, so bad input fails fast and writes nothing.
    output::check_output_dir(&args.out).context("--out")?;
    generate::check_counts(
        args.steps,
        args.num_images.unwrap_or(1),
        args.guidance_scale,
        args.eta,
    )?;
    let denoising_steps = match args.init_image {
        Some(_) => args.steps - crate::schedulers::img2img_start_index(args.steps, args.strength)?,
        None => args.steps,
    };
    if args.latents.is_none() {
        check_seed(args.seed, args.num_images.unwrap_or(1))?;
    }
    let init_image = match &args.init_image {
        Some(p) => Some(generate::load_init_image(p, args.max_pixels)?),
        None => None,
    };
    let guidance = guidance_config(&args.guidance)?;
    let suite = match &args.probe_suite {
        Some(p) => Some(crate::probe::suite::Suite::load(p)?),
        None => None,
    };
    let loading = Progress::new(mode, 0, "");
    if guidance.as_ref().is_some_and(|g| !g.is_active()) {
        // Scale or weights of 0 are a valid ablation, but rarely meant when a target is given.
        loading.warn(
            "guidance is off: every guidance term has scale or weight 0, so the image is the unguided one",
            serde_json::json!({"event": "ignored", "option": "guidance", "reason": "all weights 0"}),
        );
    } else if let Some(why) = guidance
        .as_ref()
        .and_then(|g| g.empty_window(denoising_steps))
    {
        loading.warn(
            &format!("guidance is off: {why}"),
            serde_json::json!({"event": "ignored", "option": "guidance", "reason": why}),
        );
    }
    if !args.negative_prompt.is_empty() && args.guidance_scale <= 1.0 {
        loading.warn(
            &format!(
                "--negative-prompt is ignored: it acts through classifier-free guidance, which \
                 --guidance-scale {} (<= 1) turns off",
                args.guidance_scale
            ),
            serde_json::json!({"event": "ignored", "option": "negative-prompt", "guidance_scale": args.guidance_scale}),
        );
    }
    loading.event(
        "loading model…",
        serde_json::json!({"event": "loading", "model": args.model.as_deref().or(args.random_weights.as_deref())}),
    );
    let model = match (&args.model, &args.random_weights) {
        (_, Some(arch)) => SdModel::random(arch.parse::<RandomArch>()?, 0, &opts)?,
        (Some(m), None) => SdModel::load(m, &opts)?,
        (None, None) => anyhow::bail!("--model is required"),
    };
    let scheduler = scheduler.resolve(&model.scheduler_config);
    if let Some(reason) = &scheduler.reason {
        loading.event(
            &format!("scheduler {reason}"),
            serde_json::json!({"event": "scheduler", "scheduler": scheduler.kind.cli_name(), "reason": reason}),
        );
    }
    for (flag, text) in [
        ("--prompt", &args.prompt),
        ("--negative-prompt", &args.negative_prompt),
    ] {
        if let Some((tokens, room)) = model.prompt_overflow(text)? {
            loading.warn(
                &format!("{flag} is {tokens} tokens; the text encoder reads the first {room}, the rest is ignored"),
                serde_json::json!({"event": "truncated", "option": &flag[2..], "tokens": tokens, "kept": room}),
            );
        }
    }
    // TEXT:WEIGHT is ambiguous when the text has colons or numbers of its own: say how such
    // a prompt was read.
    for p in &args.guidance.clip_prompts {
        if let Some(how) = TextTarget::ambiguity(p) {
            loading.warn(
                &format!("--clip-prompt `{p}`: {how}"),
                serde_json::json!({"event": "clip_prompt", "given": p, "note": how}),
            );
        }
    }
    if args.eta != 0.0 && scheduler.kind != crate::schedulers::SchedulerKind::Ddim {
        loading.warn(
            &format!(
                "--eta {} is ignored: it applies to DDIM only, and the scheduler is {}",
                args.eta,
                scheduler.kind.cli_name()
            ),
            serde_json::json!({"event": "ignored", "option": "eta", "scheduler": scheduler.kind.cli_name()}),
        );
    }
    let (iw, ih) = match &init_image {
        Some(t) => (Some(t.dim(3)?), Some(t.dim(2)?)),
        None => (None, None),
    };
    let width = args.width.or(iw).unwrap_or_else(|| model.default_size());
    let height = args.height.or(ih).unwrap_or_else(|| model.default_size());
    let (c, h, w) = match (model.latent_shape(width, height), &args.init_image) {
        (Ok(shape), _) => shape,
        // The bad side came from the init image (which is not resized): say so.
        (Err(crate::Error::Value { name, message }), Some(p))
            if (name == "width" && args.width.is_none())
                || (name == "height" && args.height.is_none()) =>
        {
            anyhow::bail!(
                "--init-image {}: {}x{} does not fit the model ({name}: {message}); crop or resize the image",
                p.display(),
                iw.unwrap_or(width),
                ih.unwrap_or(height)
            )
        }
        (Err(e), _) => return Err(e.into()),
    };
    let latents = match &args.latents {
        Some(p) => Some(generate::load_latents(p, (c, h, w))?),
        None => None,
    };
    let num_images = match (args.num_images, &latents) {
        (Some(n), _) => n,
        (None, Some(l)) => l.dim(0)?,
        (None, None) => 1,
    };
    check_seed(args.seed, num_images)?;
    let gopts = GenerateOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler: scheduler.kind,
        eta: args.eta,
        seed: args.seed,
        width,
        height,
        num_images,
        init_image,
        strength: args.strength,
        latents,
        guide: None,
    };
    generate::validate(&model, &gopts).map_err(|e| match (e, &args.init_image) {
        (crate::Error::Value { name, message }, Some(p)) if name == "init-image" => {
            anyhow::anyhow!("--init-image {}: {message}", p.display())
        }
        (e, _) => e.into(),
    })?;
    let mut gopts = gopts;
    if let Some(cfg) = guidance.filter(GuidanceConfig::is_active) {
        loading.event(
            "loading guide…",
            serde_json::json!({"event": "loading", "clip": cfg.clip, "decoder": cfg.decoder.name()}),
        );
        let guide = Guide::load(cfg, &model, &opts.hub, args.max_pixels)?;
        if let crate::guidance::GuidanceDecoder::Linear(l) = &guide.decoder {
            loading.event(
                &format!(
                    "linear guidance decoder fitted to the VAE: R^2 {:.3} {:.3} {:.3}",
                    l.r_squared[0], l.r_squared[1], l.r_squared[2]
                ),
                serde_json::json!({"event": "linear_decoder", "r_squared": l.r_squared}),
            );
        }
        gopts.guide = Some(std::sync::Arc::new(guide));
    }
    // Every input is good: make sure the images can be written before the long work (the
    // folder is made only now, so a bad input above leaves nothing behind).
    output::prepare_output_dir(&args.out).context("--out")?;
    // Held-out probing: the probe CLIP, and the guide CLIP itself so the sidecar shows
    // whether guidance fooled only the model it was steered by.
    let mut probers = Vec::new();
    if let (Some(spec), Some(suite)) = (&args.probe_clip, &suite) {
        let guide_clip = gopts
            .guide
            .as_ref()
            .and_then(|g| g.config.clip.clone())
            .filter(|c| c != spec);
        for spec in std::iter::once(spec.clone()).chain(guide_clip) {
            let enc =
                crate::probe::embed::ClipEncoder::load(&spec, &opts.hub, opts.dtype, &opts.device)?;
            probers.push(crate::probe::runner::Prober::new(enc, suite.clone())?);
        }
    }

    // Hash model files on another core while the first image is sampled.
    let files = model.files.clone();
    let hasher = std::thread::spawn(move || {
        crate::models::file_hash::HashCache::default().sha256_files(&files)
    });
    let mut hashes: Option<BTreeMap<String, String>> = None;
    let mut hasher = Some(hasher);

    let steps_per_image = match &gopts.init_image {
        Some(_) => {
            gopts.steps - crate::schedulers::img2img_start_index(gopts.steps, gopts.strength)?
        }
        None => gopts.steps,
    };
    let progress = Progress::new(mode, (steps_per_image * num_images) as u64, "generating");
    generate::generate(&model, &gopts, &progress, |g| {
        if hashes.is_none() {
            let h = hasher
                .take()
                .expect("hasher joined once")
                .join()
                .map_err(|_| crate::Error::Msg("model file hashing panicked".into()))??;
            hashes = Some(h);
        }
        let paths = write_image(
            &model,
            args,
            &gopts,
            &g,
            hashes.as_ref().expect("set above"),
            &probers,
        )?;
        let png = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "png"));
        let png_s = png.map(|p| p.display().to_string()).unwrap_or_default();
        progress.event(
            &format!("wrote {png_s}"),
            serde_json::json!({"event": "image", "index": g.index, "seed": g.seed, "path": png_s,
                               "files": paths_json(&paths), "timings": g.timings}),
        );
        Ok(())
    })?;
    progress.finish();
    Ok(())
}

/// The guidance settings the options ask for; None when no guidance option was given.
fn guidance_config(a: &GuidanceArgs) -> Result<Option<GuidanceConfig>> {
    let any = a.clip.is_some()
        || !a.clip_prompts.is_empty()
        || a.clip_image.is_some()
        || a.style_image.is_some()
        // Given at all, even as 0: then `generate` warns that guidance is off, rather than
        // leaving the options that tune it silently unused.
        || a.tv_weight.is_some()
        || a.range_weight.is_some();
    if !any {
        return Ok(None);
    }
    if a.clip.is_some()
        && a.clip_prompts.is_empty()
        && a.clip_image.is_none()
        && a.style_image.is_none()
    {
        anyhow::bail!(
            "--clip: nothing to guide toward; add --clip-prompt, --clip-image or --style-image"
        );
    }
    let prompts = a
        .clip_prompts
        .iter()
        .map(|p| p.parse::<TextTarget>())
        .collect::<crate::Result<Vec<_>>>()?;
    for p in a.clip_image.iter().chain(&a.style_image) {
        if !p.is_file() {
            anyhow::bail!("{}: no such image file", p.display());
        }
    }
    let cfg = GuidanceConfig {
        clip: a.clip.clone(),
        prompts,
        image: a.clip_image.clone(),
        image_weight: a.clip_image_weight,
        scale: a.clip_guidance_scale,
        cutouts: a.cutouts,
        every: a.guide_every,
        start: a.guide_start,
        end: a.guide_end,
        clamp: a.guide_clamp,
        tv_weight: a.tv_weight.unwrap_or(0.0),
        range_weight: a.range_weight.unwrap_or(0.0),
        style: a.style_image.as_ref().map(|image| StyleConfig {
            image: image.clone(),
            weight: a.style_weight,
            embed_weight: a.style_embed_weight,
            layers: a.style_layers.clone(),
            content_weight: a.content_weight,
            content_layers: None,
        }),
        decoder: a.guidance_decoder.parse()?,
        taesd: a.taesd.clone(),
        on_nonfinite: if a.skip_nonfinite_guidance {
            OnNonFinite::Skip
        } else {
            OnNonFinite::Error
        },
    };
    cfg.validate()?;
    Ok(Some(cfg))
}

fn write_image(
    model: &SdModel,
    args: &GenerateArgs,
    g_opts: &GenerateOptions,
    g: &Generated,
    hashes: &BTreeMap<String, String>,
    probers: &[crate::probe::runner::Prober],
) -> crate::Result<Vec<PathBuf>> {
    let mut params = generate::generation_params(
        model,
        g_opts,
        g,
        generate::model_hash(hashes),
        args.init_image.as_ref().map(|p| p.display().to_string()),
    );
    generate::record_input_files(&mut params, g_opts, args.init_image.as_deref())?;
    if let Some(path) = &args.latents {
        // The initial noise came from this file's row, not from the seed (which still drives
        // an ancestral sampler's per-step noise): without it the image cannot be remade.
        params.extra.insert(
            "latents".into(),
            serde_json::json!({
                "file": path.display().to_string(),
                "sha256": output::sha256_file(path)?,
                "row": g.index,
            }),
        );
    }
    let (rgb, w, h) = output::tensor_to_rgb8(&g.image)?;
    if !probers.is_empty() {
        let mut answers = serde_json::Map::new();
        for p in probers {
            let a = p.answer_rgb(&rgb, w as usize, h as usize)?;
            answers.insert(
                p.encoder.id.clone(),
                serde_json::to_value(a).unwrap_or_default(),
            );
        }
        params.extra.insert("probes".into(), answers.into());
    }
    let sidecar = output::Sidecar::new(params, hashes.clone(), g.timings.clone());
    let set = OutputSet::reserve(&args.out, &g.seed.to_string())?;
    let tensors = args.save_tensors.then_some((&g.image, &g.latents));
    let saved = set.save_generation(&sidecar, &rgb, w, h, tensors)?;
    let mut paths = vec![saved.png, saved.json];
    paths.extend(saved.tensors);
    Ok(paths)
}

fn run_bench(args: &BenchArgs, mode: ProgressMode) -> Result<()> {
    let opts = load_options(&args.run)?;
    let arch: RandomArch = args
        .arch
        .parse()
        .map_err(|_| anyhow::anyhow!("--arch `{}`: expected sd15, sd21 or sdxl", args.arch))?;
    // Every architecture here has an 8x VAE: other sizes would fail deep inside the model.
    if let Some(bad) = args.sizes.iter().find(|&&s| s == 0 || s % 8 != 0) {
        anyhow::bail!("--sizes {bad}: expected a positive multiple of 8");
    }
    check_at_least_one("--reps", args.reps)?;
    check_at_least_one("--clip-batch", args.clip_batch)?;
    for p in &args.parts {
        if !["unet", "vae", "clip", "guidance"].contains(&p.as_str()) {
            anyhow::bail!("--parts: unknown part `{p}`: expected unet, vae, clip or guidance");
        }
    }
    let plan = crate::bench::BenchPlan {
        arch,
        sizes: args.sizes.clone(),
        reps: args.reps,
        unet: args.parts.iter().any(|p| p == "unet"),
        vae: args.parts.iter().any(|p| p == "vae"),
        device: opts.device.clone(),
        dtype: opts.dtype,
    };
    let device_name = if opts.device.is_cuda() { "cuda" } else { "cpu" };
    // The table is the command's result, so --quiet keeps it (with its header) and drops only
    // progress.
    if mode != ProgressMode::Json {
        out!(
            "| workload | size | seconds, or images/s for clip (median of {}) | peak RSS | guided / unguided |",
            args.reps
        );
        out!("| --- | --- | --- | --- | --- |");
    }
    // Each row is printed as soon as it is measured; a closed stdout only loses the rows.
    let report = |m: &crate::bench::Measurement| {
        let line = match mode {
            ProgressMode::Json => {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["tool"] = "artguide".into();
                v["arch"] = args.arch.clone().into();
                v["device"] = device_name.into();
                v["dtype"] = generate::dtype_name(plan.dtype).into();
                v.to_string()
            }
            _ => format!(
                "| {} | {} | {:.3} | {} | {} |",
                m.workload,
                m.size,
                m.seconds,
                m.peak_rss_bytes
                    .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or_else(|| "n/a".into()),
                m.ratio_to_unguided
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_default()
            ),
        };
        let _ = writeln!(std::io::stdout(), "{line}");
    };
    if plan.unet || plan.vae {
        crate::bench::run(&plan, report)?;
    }
    if args.parts.iter().any(|p| p == "guidance") {
        let gplan = crate::bench::GuidanceBenchPlan {
            arch: plan.arch,
            sizes: plan.sizes.clone(),
            reps: plan.reps,
            clip_arch: args.guide_clip.clone(),
            cutouts: args.cutouts,
            decoders: args
                .guidance_decoders
                .iter()
                .map(|d| d.parse())
                .collect::<crate::Result<Vec<_>>>()?,
            device: plan.device.clone(),
            dtype: plan.dtype,
        };
        crate::bench::guidance(&gplan, report)?;
    }
    if args.parts.iter().any(|p| p == "clip") {
        for arch in &args.clip_arch {
            let m = crate::bench::clip_throughput(
                arch,
                args.clip_batch,
                args.reps,
                &plan.device,
                plan.dtype,
            )?;
            report(&m);
        }
    }
    Ok(())
}

/// Image i uses seed + i; wrapping past the largest seed would reuse seed 0's noise.
fn check_seed(seed: u64, num_images: usize) -> Result<()> {
    if seed
        .checked_add((num_images as u64).saturating_sub(1))
        .is_none()
    {
        anyhow::bail!(
            "--seed {seed}: image i uses seed + i, so seed + num-images - 1 must be at most {}",
            u64::MAX
        );
    }
    Ok(())
}

/// An error followed by what to do about it, in that order on the error line; the cause
/// stays in the chain (an interrupted run still exits 130).
#[derive(Debug)]
struct WithAdvice {
    cause: crate::Error,
    advice: String,
}

impl std::fmt::Display for WithAdvice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.cause, self.advice)
    }
}

impl std::error::Error for WithAdvice {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

/// Refuses a count of 0 where at least one is needed (`--batch 0` would otherwise be read as 1).
fn check_at_least_one(flag: &str, v: usize) -> Result<()> {
    if v == 0 {
        anyhow::bail!("{flag} 0: expected at least 1");
    }
    Ok(())
}

/// The `--json` line a failed command ends with: its error line, and whether Ctrl-C stopped it.
pub fn print_json_error(message: &str, interrupted: bool) {
    let event =
        serde_json::json!({"event": "error", "message": message, "interrupted": interrupted});
    let _ = writeln!(std::io::stdout(), "{event}");
}

/// Paths as JSON strings; `json!` on a path panics when it is not UTF-8.
fn paths_json(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// Whether a failure is only stdout's reader having gone away (`artguide ... | head`): the
/// command then ends quietly, as Unix tools do.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The one line a failed command prints: the error and its causes, each cause left out when
/// the line already says it (an I/O error's text is usually part of the message that wraps
/// it).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(crate::Error::io("nope.png", io)).context("--init-image");
        assert_eq!(
            error_line(&e),
            "--init-image: nope.png: No such file or directory"
        );
        let e = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(error_line(&e), "outer: inner cause");
    }
}
