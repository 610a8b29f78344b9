//! A whole training run: steps until the configured count, checkpoints and attention maps when
//! they are due, and a stop signal. The command line and the browser's worker both drive
//! training through [`run`]; they only decide what to do with its events.

use std::time::Duration;

use web_time::Instant;

use super::train::{TrainError, TrainState, Trainer};
use super::{Identity, IdentityError};
use crate::face::Descriptor;
use crate::face::score::{FaceModels, Reference};
use crate::identity::settings::StepReport;
use crate::pipeline::{self, Event, Flow, GenerateRequest, GivenNoise, PipelineError};
use crate::rgb::RgbImage;
use crate::schedule::SchedulerConfig;

/// When a periodic piece of work (a checkpoint, attention maps) is due.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Due {
    /// Every this many steps; 0: not by count.
    pub every: usize,
    /// Also once this much time has passed since the last one (slow GPUs take minutes per
    /// step, and a count alone would leave long gaps).
    pub after: Option<Duration>,
    /// After the first step (the first maps show at once what training looks at).
    pub first_step: bool,
    /// After the last step. Otherwise the last step counts as no other.
    pub last_step: bool,
}

impl Due {
    fn at(&self, step: usize, total: usize, since: Instant) -> bool {
        if step == total {
            return self.last_step;
        }
        (self.every > 0 && step.is_multiple_of(self.every))
            || self.after.is_some_and(|after| since.elapsed() >= after)
            || (self.first_step && step == 1)
    }

    /// Steps from `step` to the next one due by count (or to the last step).
    fn steps_to_next(&self, step: usize, total: usize) -> usize {
        let left = total.saturating_sub(step);
        if self.first_step && step == 0 {
            1
        } else if self.every > 0 {
            left.min(self.every - step % self.every)
        } else {
            left
        }
    }
}

/// The most steps run between two readbacks.
const MAX_STEPS_PER_READ: usize = 16;

/// [`Schedule::read_every`] for the page and the command line: the stop signal is seen within
/// half a second on a fast GPU; a GPU that takes longer for one step still reads every step.
pub const READ_EVERY: Duration = Duration::from_millis(500);

/// What a run reports, and when.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Schedule {
    /// When to emit [`TrainEvent::Checkpoint`].
    pub checkpoint: Due,
    /// When to emit [`TrainEvent::Maps`].
    pub maps: Due,
    /// Attention maps before the first step (or before the first step after resuming).
    pub maps_before_training: bool,
    /// How long steps may run between two readbacks, and so between two looks at the stop
    /// signal (zero: every step). On a fast GPU a readback a step leaves it idle while the
    /// host waits; several steps a read (at most 16) keep it busy.
    pub read_every: Duration,
}

/// What happened in a run, in order: after each batch of steps their reports, then a
/// checkpoint if one is due, then attention maps if they are due.
#[derive(Debug)]
pub enum TrainEvent {
    /// A step finished: its numbers.
    Step(StepReport),
    /// A checkpoint file (the identity with the optimizer state) that resumes the run.
    Checkpoint {
        /// Steps done when it was taken.
        step: usize,
        /// The file: an identity file whose metadata also holds the optimizer state (read it
        /// with [`Identity::from_bytes`], then resume with [`Trainer::resume_state`]).
        bytes: Vec<u8>,
    },
    /// A denoising step of a preview done: the run is busy drawing, not stuck.
    PreviewStep {
        /// Denoising steps done.
        step: usize,
        /// Denoising steps in the preview.
        total: usize,
    },
    /// A preview image of the identity so far ([`Previews`]).
    Preview {
        /// Steps done when it was drawn.
        step: usize,
        /// The image.
        image: RgbImage,
        /// The cosine similarity of its most confident face to the photos' faces; `None` where
        /// it shows no face or previews are not scored.
        likeness: Option<f32>,
    },
    /// The identity token's attention map beside the class word's, for the draw of the last
    /// step (`step` 0: before training, at the first draw).
    Maps {
        /// Steps done when the maps were drawn.
        step: usize,
        /// The draw's timestep, which decides the stage whose vectors are shown.
        timestep: usize,
        /// A grey image twice as wide as high: the identity token's map on the left, the
        /// class word's on the right (see [`Trainer::attention_maps`]).
        maps: RgbImage,
    },
}

/// Preview images during a run: the identity as it is so far, drawn by the model, and how much
/// its face looks like the photos' (the likeness curve that shows when more steps stop helping).
pub struct Previews<'a> {
    /// When one is drawn.
    pub due: Due,
    /// The generation; its prompt names the identity as `<token>`. The same request (and seed)
    /// each time, so that what changes between previews is the identity.
    pub request: GenerateRequest,
    /// The model's scheduler.
    pub scheduler: &'a SchedulerConfig,
    /// The face models and the faces of the photos, to score each preview; `None` leaves them
    /// unscored (no face models, or a subject without a face).
    pub faces: Option<(&'a FaceModels, Vec<Descriptor>)>,
}

impl Previews<'_> {
    /// The usual preview of an identity: "a photo of <token>" at the training resolution, 20
    /// steps of the default sampler at the family's guidance, with `seed`.
    pub fn request(token: &str, resolution: usize, guidance: f64, seed: u64) -> GenerateRequest {
        GenerateRequest {
            prompt: format!("a photo of <{token}>"),
            steps: 20,
            guidance,
            seed,
            width: resolution,
            height: resolution,
            ..GenerateRequest::default()
        }
    }
}

/// Asked of the stop signal before each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Stop and hand back a checkpoint to continue from later.
    Pause,
    /// Stop and keep nothing.
    Cancel,
}

/// How a run ended.
#[derive(Debug)]
pub enum Finished {
    /// Every step ran: the learned identity.
    Done(Box<Identity>),
    /// The stop signal ended it after `step` steps.
    Stopped {
        /// Steps done.
        step: usize,
        /// With [`Stop::Pause`]: the checkpoint to continue from.
        checkpoint: Option<Vec<u8>>,
    },
}

/// Trains from `state` until the configured number of steps or until `stop` says so, passing
/// every event to `on_event`, with preview images where `previews` asks for them. Errors of
/// the consumer (`E`) stop the run as training errors do.
pub async fn run<E>(
    trainer: &Trainer<'_>,
    state: &mut TrainState,
    schedule: &Schedule,
    previews: Option<&Previews<'_>>,
    stop: &mut dyn FnMut() -> Option<Stop>,
    on_event: &mut dyn FnMut(TrainEvent) -> Result<(), E>,
) -> Result<Finished, E>
where
    E: From<TrainError> + From<IdentityError>,
{
    let total = trainer.config.steps;
    if schedule.maps_before_training {
        on_event(maps(trainer, state).await?)?;
    }
    let now = Instant::now();
    let (mut last_checkpoint, mut last_maps, mut last_preview) = (now, now, now);
    // Steps a second, from the last batch: the first runs one step to measure it.
    let mut speed: Option<f64> = None;
    // A stop asked for while a preview was drawn, acted on before the next step.
    let mut stopped: Option<Stop> = None;
    let preview_due = previews.map_or(Due::default(), |p| p.due);
    while state.step < total {
        if let Some(how) = stopped.take().or_else(&mut *stop) {
            let checkpoint = match how {
                Stop::Pause => Some(trainer.checkpoint(state)?),
                Stop::Cancel => None,
            };
            return Ok(Finished::Stopped {
                step: state.step,
                checkpoint,
            });
        }
        let n = speed
            .map_or(1, |speed| {
                (schedule.read_every.as_secs_f64() * speed).floor() as usize
            })
            .clamp(1, MAX_STEPS_PER_READ)
            .min(schedule.checkpoint.steps_to_next(state.step, total))
            .min(schedule.maps.steps_to_next(state.step, total))
            .min(preview_due.steps_to_next(state.step, total))
            .max(1);
        // Events due by count fall on a batch's last step (`n` stops there).
        let reports = trainer.steps(state, n).await?;
        speed = reports.last().map(|r| r.steps_per_second);
        for report in reports {
            on_event(TrainEvent::Step(report))?;
        }
        let step = state.step;
        if schedule.checkpoint.at(step, total, last_checkpoint) {
            on_event(TrainEvent::Checkpoint {
                step,
                bytes: trainer.checkpoint(state)?,
            })?;
            last_checkpoint = Instant::now();
        }
        if schedule.maps.at(step, total, last_maps) {
            on_event(maps(trainer, state).await?)?;
            last_maps = Instant::now();
        }
        if let Some(previews) = previews
            && previews.due.at(step, total, last_preview)
        {
            let drawn = preview(trainer, state, previews, stop, &mut stopped, on_event).await?;
            if let Some(event) = drawn {
                on_event(event)?;
            }
            last_preview = Instant::now();
        }
    }
    Ok(Finished::Done(Box::new(trainer.identity(state))))
}

/// A preview of the identity as it is, scored where faces are given, each denoising step
/// reported to `on_event`; `None` where the stop signal ended it (kept in `stopped` for the run
/// to act on).
async fn preview<E: From<TrainError>>(
    trainer: &Trainer<'_>,
    state: &TrainState,
    previews: &Previews<'_>,
    stop: &mut dyn FnMut() -> Option<Stop>,
    stopped: &mut Option<Stop>,
    on_event: &mut dyn FnMut(TrainEvent) -> Result<(), E>,
) -> Result<Option<TrainEvent>, E> {
    let identity = trainer.identity(state);
    let mut failed = None;
    let generated = pipeline::generate(
        trainer.sd(),
        previews.scheduler,
        &previews.request,
        std::slice::from_ref(&identity),
        &GivenNoise::default(),
        trainer.device(),
        &mut |event| {
            let Event::Step { step, total, .. } = event else {
                return Flow::Continue;
            };
            if let Err(e) = on_event(TrainEvent::PreviewStep { step, total }) {
                failed = Some(e);
                return Flow::Cancel;
            }
            match stop() {
                Some(how) => {
                    *stopped = Some(how);
                    Flow::Cancel
                }
                None => Flow::Continue,
            }
        },
    )
    .await;
    if let Some(e) = failed {
        return Err(e);
    }
    let image = match generated {
        Ok(g) => g.images.into_iter().next().expect("one image asked for"),
        Err(PipelineError::Cancelled) => return Ok(None),
        Err(PipelineError::Read(e)) => return Err(TrainError::Read(e).into()),
        Err(e) => return Err(TrainError::Preview(e).into()),
    };
    let likeness = match &previews.faces {
        Some((models, faces)) if !faces.is_empty() => {
            let reference = Reference {
                name: format!("<{}>", identity.token),
                faces: faces.clone(),
            };
            let scores = models
                .score(&image, std::slice::from_ref(&reference))
                .await
                .map_err(|e| TrainError::Read(e.to_string()))?;
            scores.first().map(|s| s.similarity)
        }
        _ => None,
    };
    Ok(Some(TrainEvent::Preview {
        step: state.step,
        image,
        likeness,
    }))
}

/// The attention maps of the last step's draw (the first draw before any step).
async fn maps(trainer: &Trainer<'_>, state: &TrainState) -> Result<TrainEvent, TrainError> {
    let draw = trainer.draw(state.step.saturating_sub(1));
    let maps = trainer.attention_maps(state, &draw).await?;
    Ok(TrainEvent::Maps {
        step: state.step,
        timestep: draw.timestep,
        maps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_by_count_first_and_last_step() {
        let now = Instant::now();
        let every_2 = Due {
            every: 2,
            ..Due::default()
        };
        let at = |d: Due| (1..=5).filter(|&s| d.at(s, 5, now)).collect::<Vec<_>>();
        assert_eq!(at(every_2), [2, 4]);
        assert_eq!(
            at(Due {
                last_step: true,
                first_step: true,
                ..every_2
            }),
            [1, 2, 4, 5]
        );
        // The last step follows its own rule, even when the count falls on it.
        let every_5 = Due {
            every: 5,
            ..Due::default()
        };
        assert_eq!(at(every_5), Vec::<usize>::new());
        assert_eq!(at(Due::default()), Vec::<usize>::new());
    }

    #[test]
    fn due_after_a_time() {
        let long_ago = Instant::now() - Duration::from_secs(30);
        let d = Due {
            after: Some(Duration::from_secs(20)),
            ..Due::default()
        };
        assert!(d.at(3, 10, long_ago));
        assert!(!d.at(3, 10, Instant::now()));
    }
}
