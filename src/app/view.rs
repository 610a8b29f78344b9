//! What the page's panels show, as plain data, and how each worker response changes it. The
//! leptos components (`ui/`) hold these in signals and only render them; the transitions live
//! here so that they build and are tested natively, without a browser. Blob URLs are made and
//! revoked by the caller: a method that replaces one returns the old one to revoke.

use serde::{Deserialize, Serialize};

use crate::identity::settings::{StepReport, TrainConfig};
use crate::pipeline::GenerateRequest;

/// The kinds of error the page shows, each with its own title. The kind is also the error
/// box's `data-kind`, which the end-to-end tests read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The page's Content-Security-Policy does not let it reach the model's host.
    BlockedHost,
    /// A download failed or was refused.
    Network,
    /// The files are not a model this app can run.
    BadModel,
    /// The browser's storage quota is used up.
    StorageFull,
    /// The browser's storage failed otherwise.
    Storage,
    /// The GPU ran out of memory or refused a buffer.
    OutOfMemory,
    /// The GPU device was lost (driver reset, reclaimed by the browser).
    DeviceLost,
    /// The browser offers no WebGPU adapter.
    NoWebGpu,
    /// A photo could not be decoded.
    BadPhoto,
    /// An image holds no generation parameters that can be read.
    BadImage,
    /// An identity file is damaged or made for another model.
    BadIdentity,
    /// The work needs a loaded model.
    NoModel,
    /// A name that is taken.
    Exists,
    /// The user stopped the work.
    Cancelled,
    /// Another tab of the site is doing this (training, downloading this model).
    Busy,
    /// The GPU worker stopped answering (a hung driver) and was stopped.
    Stalled,
    /// The page and its worker come from different builds (the site was updated).
    Outdated,
    /// Anything else (a bug, most likely).
    Other,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 18] = [
        ErrorKind::BlockedHost,
        ErrorKind::Network,
        ErrorKind::BadModel,
        ErrorKind::StorageFull,
        ErrorKind::Storage,
        ErrorKind::OutOfMemory,
        ErrorKind::DeviceLost,
        ErrorKind::NoWebGpu,
        ErrorKind::BadPhoto,
        ErrorKind::BadImage,
        ErrorKind::BadIdentity,
        ErrorKind::NoModel,
        ErrorKind::Exists,
        ErrorKind::Cancelled,
        ErrorKind::Busy,
        ErrorKind::Stalled,
        ErrorKind::Outdated,
        ErrorKind::Other,
    ];

    /// The `data-kind` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BlockedHost => "blocked-host",
            ErrorKind::Network => "network",
            ErrorKind::BadModel => "bad-model",
            ErrorKind::StorageFull => "storage-full",
            ErrorKind::Storage => "storage",
            ErrorKind::OutOfMemory => "out-of-memory",
            ErrorKind::DeviceLost => "device-lost",
            ErrorKind::NoWebGpu => "no-webgpu",
            ErrorKind::BadPhoto => "bad-photo",
            ErrorKind::BadImage => "bad-image",
            ErrorKind::BadIdentity => "bad-identity",
            ErrorKind::NoModel => "no-model",
            ErrorKind::Exists => "exists",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Busy => "busy",
            ErrorKind::Stalled => "stalled",
            ErrorKind::Outdated => "outdated",
            ErrorKind::Other => "error",
        }
    }

    /// The error box's heading.
    pub fn title(self) -> &'static str {
        match self {
            ErrorKind::BlockedHost => "This host is not allowed",
            ErrorKind::Network => "The download failed",
            ErrorKind::BadModel => "This model cannot be used",
            ErrorKind::StorageFull => "Storage is full",
            ErrorKind::Storage => "The browser's storage failed",
            ErrorKind::OutOfMemory => "Not enough GPU memory",
            ErrorKind::DeviceLost => "The GPU stopped",
            ErrorKind::NoWebGpu => "WebGPU is not available",
            ErrorKind::BadPhoto => "This photo cannot be read",
            ErrorKind::BadImage => "No settings in this image",
            ErrorKind::BadIdentity => "This identity cannot be used",
            ErrorKind::NoModel => "No model yet",
            ErrorKind::Exists => "That name is taken",
            ErrorKind::Cancelled => "Cancelled",
            ErrorKind::Busy => "Busy in another tab",
            ErrorKind::Stalled => "The GPU stopped answering",
            ErrorKind::Outdated => "SeFi Studio was updated",
            ErrorKind::Other => "Something went wrong",
        }
    }
}

/// An error as the page shows it: a kind (title, `data-kind`) and what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub struct UiError {
    /// Decides the title.
    pub kind: ErrorKind,
    /// What happened and what to do, in full sentences.
    pub message: String,
}

impl UiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Where a training run is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing runs.
    #[default]
    Idle,
    /// The worker is training.
    Running,
    /// Pause asked; the worker finishes its step first.
    Stopping,
    /// Stopped with a checkpoint in storage, to resume.
    Paused,
    /// Every step ran; the identity is stored.
    Done,
    /// The worker reported an error or died.
    Failed,
}

/// A run in storage: `runs/current/run.json`, beside its photos and checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's settings.
    pub config: TrainConfig,
    /// The stored model it trains on (runs continue only on the same model).
    pub model_id: String,
    /// That model's name, to tell the user which to load.
    pub model_name: String,
    /// How many `photo-<i>.png` files the run has.
    pub photos: usize,
    /// Steps in the stored checkpoint.
    pub step: usize,
}

/// What the training part of the identity panel shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainView {
    /// Where the run is.
    pub phase: Phase,
    /// The name being learned.
    pub token: String,
    /// Steps done.
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// (step, loss, attention term)
    pub points: Vec<(usize, f64, f64)>,
    /// Smoothed training speed.
    pub steps_per_second: f64,
    /// The step of the last checkpoint in storage.
    pub checkpoint_step: Option<usize>,
    /// Heat-maps (identity, class word) as blob URLs, and the step they are from.
    pub maps: Option<(String, String, usize)>,
    /// The first training square, under the heat-maps.
    pub underlay: Option<String>,
    /// The last preview image as a blob URL, and the step it is from.
    pub preview: Option<(String, usize)>,
    /// (step, likeness) of the previews that showed a face: the likeness curve.
    pub likeness: Vec<(usize, f32)>,
    /// Denoising steps done and in all of the preview being drawn, while one is.
    pub drawing: Option<(usize, usize)>,
    /// Why this run draws no previews, where it was asked for some.
    pub no_previews: Option<String>,
    /// The last error, shown until the next run starts.
    pub error: Option<UiError>,
    /// An unfinished run found in storage.
    pub offer: Option<RunRecord>,
}

impl TrainView {
    /// A run starting (or continuing at `start`): a fresh view that keeps the last heat-maps
    /// until new ones come. Returns the old underlay's URL.
    pub fn start(
        &mut self,
        config: &TrainConfig,
        start: usize,
        underlay: Option<String>,
    ) -> Option<String> {
        let old = self.underlay.take();
        *self = TrainView {
            phase: Phase::Running,
            token: config.token.clone(),
            total: config.steps,
            step: start,
            checkpoint_step: (start > 0).then_some(start),
            underlay,
            maps: self.maps.take(),
            preview: self.preview.take(),
            // A continued run goes on with its curve.
            likeness: match start {
                0 => Vec::new(),
                _ => std::mem::take(&mut self.likeness),
            },
            ..TrainView::default()
        };
        old
    }

    /// Whether the worker is busy with the run.
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Stopping)
    }

    /// A step's report: progress, the loss chart, and a smoothed speed (one slow step, a
    /// checkpoint or the heat-maps, does not make it jump).
    pub fn step_done(&mut self, r: &StepReport) {
        self.drawing = None;
        self.step = r.step;
        self.total = r.total;
        self.points.push((r.step, r.loss, r.attn_loss));
        self.steps_per_second = if self.steps_per_second == 0.0 {
            r.steps_per_second
        } else {
            0.8 * self.steps_per_second + 0.2 * r.steps_per_second
        };
    }

    /// New heat-maps; returns the replaced ones' URLs.
    pub fn show_maps(
        &mut self,
        identity: String,
        class: String,
        step: usize,
    ) -> Option<(String, String)> {
        let old = self.maps.take().map(|(a, b, _)| (a, b));
        self.maps = Some((identity, class, step));
        old
    }

    /// A new preview (its likeness on the curve, where it shows a face). Returns the old
    /// preview's URL.
    pub fn show_preview(
        &mut self,
        url: String,
        step: usize,
        likeness: Option<f32>,
    ) -> Option<String> {
        self.drawing = None;
        if let Some(l) = likeness {
            self.likeness.retain(|&(s, _)| s < step);
            self.likeness.push((step, l));
        }
        self.preview.replace((url, step)).map(|(old, _)| old)
    }

    /// A checkpoint was written to storage (or could not be).
    pub fn checkpoint_saved(&mut self, step: usize, saved: Result<(), UiError>) {
        match saved {
            Ok(()) => {
                self.checkpoint_step = Some(step);
                // Storage works again: a checkpoint that could not be stored is history.
                if self
                    .error
                    .as_ref()
                    .is_some_and(|e| matches!(e.kind, ErrorKind::StorageFull | ErrorKind::Storage))
                {
                    self.error = None;
                }
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// The worker stopped the run after `step` steps, and its checkpoint was stored (pause) or
    /// the run removed (cancel).
    pub fn stopped(&mut self, step: usize, stored: Result<(), UiError>) {
        self.phase = if self.phase == Phase::Stopping && step < self.total {
            Phase::Paused
        } else {
            Phase::Idle
        };
        if let Err(e) = stored {
            self.error = Some(e);
        }
    }

    /// Every step ran and the identity was stored (or could not be).
    pub fn done(&mut self, stored: Result<(), UiError>) {
        self.phase = Phase::Done;
        self.offer = None;
        if let Err(e) = stored {
            self.error = Some(e);
        }
    }

    /// The worker reported an error.
    pub fn failed(&mut self, error: UiError) {
        self.phase = Phase::Failed;
        self.error = Some(error);
    }

    /// The worker died: a run in progress fails.
    pub fn crashed(&mut self, error: UiError) {
        if self.is_running() {
            self.failed(error);
        }
    }

    /// An unfinished run found in storage, offered when nothing runs.
    pub fn offer_unfinished(&mut self, record: RunRecord) {
        if self.phase == Phase::Idle {
            self.offer = Some(record);
        }
    }
}

/// What the generate panel shows of the generation in progress.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenView {
    /// Whether the worker is generating.
    pub running: bool,
    /// Denoising steps done.
    pub step: usize,
    /// Denoising steps in all.
    pub total: usize,
    /// The latest preview's blob URL.
    pub preview: Option<String>,
    /// The last error, shown until the next generation starts.
    pub error: Option<UiError>,
    /// What the pipeline warned about (a prompt cut at its length limit, say).
    pub warnings: Vec<String>,
    /// What the generation under way was asked, and of which model: the gallery's record of
    /// its images.
    pub asked: Option<(GenerateRequest, String)>,
}

impl GenView {
    /// A generation of `total` steps starting; returns a leftover preview's URL.
    pub fn start(&mut self, total: usize) -> Option<String> {
        let old = self.preview.take();
        *self = GenView {
            running: true,
            total,
            ..GenView::default()
        };
        old
    }

    /// A step done, maybe with a new preview; returns the replaced preview's URL.
    pub fn step_done(
        &mut self,
        step: usize,
        total: usize,
        preview: Option<String>,
    ) -> Option<String> {
        self.step = step;
        self.total = total;
        preview.and_then(|p| self.preview.replace(p))
    }

    /// The images came: the preview goes (its URL is returned).
    pub fn done(&mut self, warnings: Vec<String>) -> Option<String> {
        self.running = false;
        self.warnings = warnings;
        self.preview.take()
    }

    /// The worker reported an error; returns the preview's URL.
    pub fn failed(&mut self, error: UiError) -> Option<String> {
        self.running = false;
        self.error = Some(error);
        self.preview.take()
    }

    /// The worker died: a generation in progress fails.
    pub fn crashed(&mut self, error: UiError) {
        if self.running {
            self.running = false;
            self.error = Some(error);
        }
    }

    /// A new image that could not be stored: shown, with what to do.
    pub fn unsaved(&mut self, error: &UiError) {
        self.error = Some(UiError::new(
            error.kind,
            format!(
                "{} The new image is shown below but not kept: download it before leaving the page.",
                error.message
            ),
        ));
    }
}

/// Notices a GPU worker that stopped making progress (a hung driver, a deadlock): a job in
/// flight with no report for far longer than its steps take. The limit is
/// [`Watchdog::FACTOR`] times the median time between step reports, and never less than
/// [`Watchdog::FLOOR_MS`]. Until a job's second step, and after its last one, the worker may be
/// setting up (moving weights, compiling shaders for the forward and backward passes, decoding
/// the image), and the limit is at least [`Watchdog::FIRST_MS`]. Times are milliseconds of one
/// clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Watchdog {
    /// Jobs sent and not yet answered.
    jobs: usize,
    /// When the worker last reported (or a job started).
    last: f64,
    /// Steps reported since the last set-up began.
    steps: usize,
    /// The latest times between step reports.
    gaps: std::collections::VecDeque<f64>,
}

/// What a report from the worker says about its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A step of a job (training, denoising).
    Step,
    /// A job's last step: what follows (decoding, saving) is set-up again.
    LastStep,
    /// Any other sign of life (a tensor loaded, heat-maps, a checkpoint).
    Other,
}

impl Watchdog {
    /// How many median steps of silence make a stall.
    pub const FACTOR: f64 = 10.0;
    /// The least silence that counts as a stall between steps.
    pub const FLOOR_MS: f64 = 60_000.0;
    /// The least silence that counts as a stall while a job sets up.
    pub const FIRST_MS: f64 = 600_000.0;
    /// Gaps remembered for the median.
    const KEPT: usize = 32;

    /// A job was sent.
    pub fn begin(&mut self, now: f64) {
        self.jobs += 1;
        self.last = now;
        self.steps = 0;
    }

    /// The worker reported.
    pub fn report(&mut self, now: f64, report: Report) {
        match report {
            Report::Step => {
                // The first step of a set-up includes it.
                if self.steps >= 1 {
                    if self.gaps.len() == Self::KEPT {
                        self.gaps.pop_front();
                    }
                    self.gaps.push_back(now - self.last);
                }
                self.steps += 1;
            }
            Report::LastStep => self.steps = 0,
            Report::Other => {}
        }
        self.last = now;
    }

    /// A job was answered (done, failed or stopped).
    pub fn end(&mut self, now: f64) {
        self.jobs = self.jobs.saturating_sub(1);
        self.last = now;
    }

    /// A new worker: nothing is in flight.
    pub fn reset(&mut self) {
        self.jobs = 0;
        self.steps = 0;
    }

    /// The median time between step reports, if any were measured.
    pub fn median(&self) -> Option<f64> {
        let mut gaps: Vec<f64> = self.gaps.iter().copied().collect();
        gaps.sort_by(f64::total_cmp);
        gaps.get(gaps.len() / 2).copied()
    }

    /// How long the worker may stay silent now.
    pub fn limit(&self) -> f64 {
        let floor = if self.steps >= 2 {
            Self::FLOOR_MS
        } else {
            Self::FIRST_MS
        };
        self.median()
            .map_or(floor, |m| (Self::FACTOR * m).max(floor))
    }

    /// How long the worker has been silent, when that is a stall.
    pub fn overdue(&self, now: f64) -> Option<f64> {
        let silent = now - self.last;
        (self.jobs > 0 && silent > self.limit()).then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_replace_each_other_and_draw_the_likeness_curve() {
        let mut t = TrainView {
            drawing: Some((3, 20)),
            ..TrainView::default()
        };
        assert_eq!(t.show_preview("a".into(), 100, Some(0.5)), None);
        assert_eq!(t.drawing, None);
        assert_eq!(t.show_preview("b".into(), 200, None), Some("a".into()));
        assert_eq!(t.show_preview("c".into(), 300, Some(0.8)), Some("b".into()));
        // A preview without a face leaves no point.
        assert_eq!(t.likeness, [(100, 0.5), (300, 0.8)]);
        // A run continued from an earlier checkpoint redraws the curve from there.
        t.show_preview("d".into(), 200, Some(0.7));
        assert_eq!(t.likeness, [(100, 0.5), (200, 0.7)]);
        let config = TrainConfig::new("alice", "person", 512);
        let old = t.start(&config, 200, None);
        assert_eq!(old, None);
        assert_eq!(t.likeness.len(), 2, "a continued run keeps its curve");
        assert_eq!(t.preview, Some(("d".into(), 200)));
        t.start(&config, 0, None);
        assert!(t.likeness.is_empty(), "a new run starts a new curve");
        // Why a run draws no previews is told for that run only.
        t.no_previews = Some("too little memory".into());
        t.start(&config, 0, None);
        assert_eq!(t.no_previews, None);
    }

    fn report(step: usize, speed: f64) -> StepReport {
        StepReport {
            step,
            total: 10,
            loss: 0.5,
            noise_loss: 0.4,
            attn_loss: 0.1,
            timestep: 500,
            stage: 2,
            steps_per_second: speed,
        }
    }

    #[test]
    fn every_error_kind_has_its_own_title_and_name() {
        let mut titles: Vec<_> = ErrorKind::ALL.iter().map(|k| k.title()).collect();
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        titles.sort();
        titles.dedup();
        names.sort();
        names.dedup();
        assert_eq!(
            (titles.len(), names.len()),
            (ErrorKind::ALL.len(), ErrorKind::ALL.len())
        );
        for kind in [ErrorKind::Exists, ErrorKind::Storage] {
            assert_ne!(kind.title(), ErrorKind::Other.title(), "{kind:?}");
        }
    }

    #[test]
    fn a_run_goes_from_start_to_done() {
        let config = TrainConfig::new("alice", "person", 512);
        let mut t = TrainView {
            maps: Some(("a".into(), "b".into(), 3)),
            underlay: Some("old".into()),
            error: Some(UiError::new(ErrorKind::Other, "before")),
            ..TrainView::default()
        };
        assert_eq!(
            t.start(&config, 0, Some("photo".into())),
            Some("old".into())
        );
        assert_eq!(
            (t.phase, t.total, t.error.clone()),
            (Phase::Running, config.steps, None)
        );
        assert_eq!(
            t.maps.as_ref().unwrap().2,
            3,
            "the last maps stay until new ones come"
        );

        t.step_done(&report(1, 2.0));
        t.step_done(&report(2, 1.0));
        assert_eq!(t.points.len(), 2);
        assert!((t.steps_per_second - 1.8).abs() < 1e-12, "smoothed");
        assert_eq!(
            t.show_maps("c".into(), "d".into(), 2),
            Some(("a".into(), "b".into()))
        );
        t.checkpoint_saved(2, Ok(()));
        assert_eq!(t.checkpoint_step, Some(2));
        t.checkpoint_saved(3, Err(UiError::new(ErrorKind::StorageFull, "full")));
        assert_eq!(t.checkpoint_step, Some(2));
        assert_eq!(t.error.as_ref().unwrap().kind, ErrorKind::StorageFull);
        t.checkpoint_saved(4, Ok(()));
        assert_eq!(
            (t.checkpoint_step, &t.error),
            (Some(4), &None),
            "space was freed"
        );

        t.offer = Some(RunRecord {
            config: config.clone(),
            model_id: "m".into(),
            model_name: "M".into(),
            photos: 1,
            step: 2,
        });
        t.done(Ok(()));
        assert_eq!((t.phase, t.offer.is_none()), (Phase::Done, true));
    }

    #[test]
    fn pausing_and_cancelling() {
        let config = TrainConfig::new("alice", "person", 512);
        let mut t = TrainView::default();
        t.start(&config, 0, None);
        t.phase = Phase::Stopping;
        t.stopped(4, Ok(()));
        assert_eq!(t.phase, Phase::Paused, "a pause before the end");
        t.start(&config, 4, None);
        assert_eq!(t.checkpoint_step, Some(4));
        t.stopped(5, Ok(()));
        assert_eq!(t.phase, Phase::Idle, "a cancel");
        t.phase = Phase::Stopping;
        t.stopped(config.steps, Err(UiError::new(ErrorKind::Storage, "gone")));
        assert_eq!(t.phase, Phase::Idle, "a pause that came at the end");
        assert_eq!(t.error.as_ref().unwrap().kind, ErrorKind::Storage);
    }

    #[test]
    fn a_crash_fails_only_a_run_in_progress_and_offers_wait_for_idle() {
        let config = TrainConfig::new("alice", "person", 512);
        let record = RunRecord {
            config: config.clone(),
            model_id: "m".into(),
            model_name: "M".into(),
            photos: 1,
            step: 2,
        };
        let mut t = TrainView::default();
        t.crashed(UiError::new(ErrorKind::DeviceLost, "lost"));
        assert_eq!((t.phase, t.error.is_none()), (Phase::Idle, true));
        t.offer_unfinished(record.clone());
        assert!(t.offer.is_some());

        let mut t = TrainView::default();
        t.start(&config, 0, None);
        t.offer_unfinished(record);
        assert!(t.offer.is_none(), "no offer while running");
        t.crashed(UiError::new(ErrorKind::DeviceLost, "lost"));
        assert_eq!(t.phase, Phase::Failed);
        assert_eq!(t.error.unwrap().kind, ErrorKind::DeviceLost);
    }

    #[test]
    fn a_generation_hands_back_each_preview_it_replaces() {
        let mut g = GenView {
            preview: Some("p0".into()),
            error: Some(UiError::new(ErrorKind::Other, "before")),
            ..GenView::default()
        };
        assert_eq!(g.start(4), Some("p0".into()));
        assert!(g.running && g.error.is_none());
        assert_eq!(g.step_done(1, 4, Some("p1".into())), None);
        assert_eq!(g.step_done(2, 4, None), None);
        assert_eq!(g.step_done(3, 4, Some("p3".into())), Some("p1".into()));
        assert_eq!(g.done(vec!["long".into()]), Some("p3".into()));
        assert!(!g.running);
        assert_eq!(g.warnings, ["long"]);
        g.crashed(UiError::new(ErrorKind::DeviceLost, "lost"));
        assert!(g.error.is_none(), "nothing was running");
        g.unsaved(&UiError::new(ErrorKind::StorageFull, "Storage is full."));
        let e = g.error.clone().unwrap();
        assert_eq!(e.kind, ErrorKind::StorageFull);
        assert!(
            e.message
                .starts_with("Storage is full. The new image is shown")
        );

        g.start(4);
        assert_eq!(g.failed(UiError::new(ErrorKind::OutOfMemory, "oom")), None);
        assert_eq!(g.error.unwrap().kind, ErrorKind::OutOfMemory);
    }
    #[test]
    fn the_watchdog_waits_ten_median_steps_with_a_floor() {
        let mut w = Watchdog::default();
        assert_eq!(w.overdue(1e9), None, "nothing in flight");
        w.begin(0.0);
        assert_eq!(w.limit(), Watchdog::FIRST_MS, "before the first step");
        // Loading reports are signs of life only.
        for i in 1..=100 {
            w.report(f64::from(i), Report::Other);
        }
        assert_eq!((w.median(), w.limit()), (None, Watchdog::FIRST_MS));
        assert_eq!(w.overdue(100.0 + Watchdog::FIRST_MS - 1.0), None);
        assert!(w.overdue(100.0 + Watchdog::FIRST_MS + 1.0).is_some());
        // The first step took 100 s (shaders compile); until the second, set-up limits apply.
        let mut last = 100_000.0;
        w.report(last, Report::Step);
        assert_eq!(w.limit(), Watchdog::FIRST_MS);
        // Steps take 20 s, one took 50 s.
        for gap in [20_000.0, 20_000.0, 50_000.0, 20_000.0] {
            last += gap;
            w.report(last, Report::Step);
        }
        assert_eq!(w.median(), Some(20_000.0), "set-up is not a step");
        assert_eq!(w.limit(), 200_000.0);
        assert_eq!(w.overdue(last + 199_000.0), None);
        assert_eq!(w.overdue(last + 201_000.0), Some(201_000.0));
        // After the last step, the image is decoded: set-up again.
        w.report(last, Report::LastStep);
        assert_eq!(w.limit(), Watchdog::FIRST_MS);

        // Fast steps: the floor.
        let mut fast = Watchdog::default();
        fast.begin(0.0);
        for i in 1..=10 {
            fast.report(f64::from(i) * 100.0, Report::Step);
        }
        assert_eq!(fast.limit(), Watchdog::FLOOR_MS);
        // A job's end stops the watch; a new job sets up again.
        fast.end(1_000.0);
        assert_eq!(fast.overdue(1e9), None);
        fast.begin(2_000.0);
        assert_eq!(fast.limit(), Watchdog::FIRST_MS);
        fast.reset();
        assert_eq!(fast.overdue(1e9), None);
    }
}
