//! Web Locks (`navigator.locks`) between the tabs of the site. Tabs of one origin share its
//! storage; a lock names what a tab is writing (models, a training run, the library of
//! identities and images) so that no two tabs write the same files at once. A lock is held
//! until its [`Held`] is dropped, or until its tab closes.

use futures::channel::oneshot;
use js_sys::{Function, Object, Promise, Reflect};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use super::StoreError;

/// Downloading, copying or deleting stored models.
pub const MODELS: &str = "sefi:models";
/// A training run (`runs/current`), from its start to its end.
pub const TRAINING: &str = "sefi:training";
/// Writing or removing identities and gallery images.
pub const LIBRARY: &str = "sefi:library";

/// A lock this tab holds; dropping it releases the lock.
pub struct Held {
    release: Option<Function>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.call0(&JsValue::UNDEFINED);
        }
    }
}

fn locks() -> Option<JsValue> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    Reflect::get(&navigator, &"locks".into())
        .ok()
        .filter(|l| !l.is_undefined())
}

async fn request(name: &str, if_available: bool) -> Result<Option<Held>, StoreError> {
    // Without Web Locks (an old browser) tabs cannot coordinate; each goes ahead alone.
    let Some(locks) = locks() else {
        return Ok(Some(Held { release: None }));
    };
    let failed = |e: JsValue| StoreError::Io {
        path: name.into(),
        reason: format!("the tab lock failed: {e:?}"),
    };
    let (tx, rx) = oneshot::channel::<Option<Function>>();
    // The browser calls this with the lock (or null: taken elsewhere); the lock is held until
    // the promise it returns settles, which `Held::drop` does.
    let granted = Closure::once_into_js(move |lock: JsValue| -> Promise {
        if lock.is_null() {
            let _ = tx.send(None);
            return Promise::resolve(&JsValue::UNDEFINED);
        }
        let mut release = None;
        let held = Promise::new(&mut |resolve, _| release = Some(resolve));
        let _ = tx.send(release);
        held
    });
    let options = Object::new();
    Reflect::set(&options, &"ifAvailable".into(), &if_available.into()).map_err(failed)?;
    let ask: Function = Reflect::get(&locks, &"request".into())
        .map_err(failed)?
        .dyn_into()
        .map_err(failed)?;
    let done: Promise = ask
        .call3(&locks, &name.into(), &options, &granted)
        .map_err(failed)?
        .dyn_into()
        .map_err(failed)?;
    // Settles when the lock is released; awaited so that a rejection is not left unhandled.
    wasm_bindgen_futures::spawn_local(async move {
        let _ = JsFuture::from(done).await;
    });
    let release = rx.await.map_err(|_| StoreError::Io {
        path: name.into(),
        reason: "the browser dropped the tab lock request".into(),
    })?;
    Ok(release.map(|f| Held { release: Some(f) }))
}

/// Takes `name` if no other tab holds it.
pub async fn try_lock(name: &str) -> Result<Option<Held>, StoreError> {
    request(name, true).await
}

/// Takes `name`, waiting for another tab to release it.
pub async fn lock(name: &str) -> Result<Held, StoreError> {
    request(name, false).await?.ok_or_else(|| StoreError::Io {
        path: name.into(),
        reason: "the tab lock was not granted".into(),
    })
}

/// Whether a tab (this one or another) holds `name` now.
pub async fn is_held(name: &str) -> bool {
    let Some(locks) = locks() else { return false };
    let Ok(query) = Reflect::get(&locks, &"query".into()).and_then(|q| q.dyn_into::<Function>())
    else {
        return false;
    };
    let Ok(p) = query.call0(&locks).and_then(|p| p.dyn_into::<Promise>()) else {
        return false;
    };
    let Ok(state) = JsFuture::from(p).await else {
        return false;
    };
    let held = Reflect::get(&state, &"held".into()).unwrap_or(JsValue::UNDEFINED);
    js_sys::Array::from(&held).iter().any(|l| {
        Reflect::get(&l, &"name".into())
            .ok()
            .and_then(|n| n.as_string())
            .as_deref()
            == Some(name)
    })
}
