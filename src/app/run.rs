//! The training run kept in storage, `runs/current/`: its photos (`photo-<i>.png`), its
//! record (`run.json`, written last: a folder without one holds no run) and its latest
//! checkpoint (`checkpoint.safetensors`). Every file is written whole ([`Store::write`]), so a
//! tab that dies at any moment leaves the run as it was before the write, or after it.

use crate::app::view::RunRecord;
use crate::identity::Identity;
use crate::identity::settings::TrainingRecord;
use crate::store::{Store, StoreError};

/// The folder of the run.
pub const RUN: &str = "runs/current";

/// A stored run as it is found in storage.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRun {
    /// The record; its `step` is the checkpoint's.
    pub record: RunRecord,
    /// The training squares, as PNG.
    pub photos: Vec<Vec<u8>>,
    /// The checkpoint to continue from; `None` starts the run again from step 0.
    pub checkpoint: Option<Vec<u8>>,
}

/// The run's folder in storage: [`RUN`] ([`Run::current`]), or another for tests.
pub struct Run<'a> {
    store: &'a Store,
    dir: String,
}

impl<'a> Run<'a> {
    /// The app's run.
    pub fn current(store: &'a Store) -> Self {
        Self::at(store, RUN)
    }

    /// A run kept in `dir`.
    pub fn at(store: &'a Store, dir: &str) -> Self {
        Self {
            store,
            dir: dir.into(),
        }
    }

    fn record_path(&self) -> String {
        format!("{}/run.json", self.dir)
    }

    fn photo_path(&self, i: usize) -> String {
        format!("{}/photo-{i}.png", self.dir)
    }

    fn checkpoint_path(&self) -> String {
        format!("{}/checkpoint.safetensors", self.dir)
    }

    /// Replaces any stored run by a new one at step 0.
    pub async fn begin(&self, record: &RunRecord, photos: &[Vec<u8>]) -> Result<(), StoreError> {
        self.remove().await?;
        for (i, png) in photos.iter().enumerate() {
            self.store.write(&self.photo_path(i), png).await?;
        }
        self.write_record(record).await
    }

    async fn write_record(&self, r: &RunRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(r).expect("plain data");
        self.store.write(&self.record_path(), text.as_bytes()).await
    }

    /// Stores a checkpoint of `step` steps, then notes the step in the record (for a reader
    /// that does not open the checkpoint; [`Run::load`] trusts the checkpoint's own count).
    pub async fn save_checkpoint(&self, step: usize, bytes: &[u8]) -> Result<(), StoreError> {
        self.store.write(&self.checkpoint_path(), bytes).await?;
        if let Some(mut r) = self.read_record().await? {
            r.step = step;
            self.write_record(&r).await?;
        }
        Ok(())
    }

    /// Removes the stored run.
    pub async fn remove(&self) -> Result<(), StoreError> {
        self.store.remove(&self.dir).await
    }

    async fn read_record(&self) -> Result<Option<RunRecord>, StoreError> {
        let Some(text) = self.store.read_text(&self.record_path()).await? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Io {
                path: self.record_path(),
                reason: format!("the stored training run is damaged ({e}); discard it"),
            })
    }

    /// The stored run, if there is one: every photo its record names, and the checkpoint if it
    /// reads as one. The record's step is the checkpoint's (0 without one), so what is offered
    /// is what continues.
    pub async fn load(&self) -> Result<Option<StoredRun>, StoreError> {
        let Some(mut record) = self.read_record().await? else {
            return Ok(None);
        };
        let mut photos = Vec::with_capacity(record.photos);
        for i in 0..record.photos {
            photos.push(self.store.read(&self.photo_path(i)).await?);
        }
        let checkpoint = match self.store.read(&self.checkpoint_path()).await {
            Ok(bytes) => checkpoint_step(&bytes).await.map(|step| (bytes, step)),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        record.step = checkpoint.as_ref().map_or(0, |(_, step)| *step);
        Ok(Some(StoredRun {
            record,
            photos,
            checkpoint: checkpoint.map(|(bytes, _)| bytes),
        }))
    }
}

/// The steps in a checkpoint, `None` if it is not a readable one.
async fn checkpoint_step(bytes: &[u8]) -> Option<usize> {
    let id = Identity::from_bytes("checkpoint", bytes.to_vec())
        .await
        .ok()?;
    TrainingRecord::steps_done_in(&id.training)
}
