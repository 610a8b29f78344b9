//! The learned identities in storage: the list, import, export, rename and delete.

use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::app::ui::widgets::{ErrorBox, ErrorKind, UiError, blob_url_of, input_files, revoke};
use crate::app::ui::{Ctx, library, store};
use crate::clip::tokenizer::{PLACEHOLDER_NAME_RULE, is_placeholder_name};
use crate::identity::Identity;
use crate::identity::settings::TrainingRecord;

/// A learned identity in storage.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityEntry {
    pub token: String,
    pub class_word: String,
    pub family: String,
    pub steps: u64,
    /// Blob URL of the file, for export.
    pub url: String,
}

pub fn identity_path(token: &str) -> String {
    format!("identities/{token}.safetensors")
}

/// Reads `identities/` into the list.
pub async fn load_list(ctx: Ctx) {
    let Ok(s) = store().await else { return };
    let mut list = Vec::new();
    for name in s.list("identities").await.unwrap_or_default() {
        let path = format!("identities/{name}");
        let Ok(file) = s.file(&path).await else {
            continue;
        };
        let Ok(bytes) = crate::store::read_blob(&path, &file).await else {
            continue;
        };
        if let Ok(id) = Identity::from_bytes(&name, bytes).await {
            list.push(IdentityEntry {
                steps: TrainingRecord::steps_done_in(&id.training).unwrap_or(0) as u64,
                token: id.token,
                class_word: id.class_word,
                family: id.family.to_string(),
                url: blob_url_of(&file),
            });
        }
    }
    ctx.identities
        .update(|old| old.iter().for_each(|e| revoke(&e.url)));
    ctx.identities.set(list);
}

/// An identity file's bytes, by token.
pub async fn identity_bytes(token: &str) -> Option<Vec<u8>> {
    store().await.ok()?.read(&identity_path(token)).await.ok()
}

#[component]
pub fn IdentityList() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let error = RwSignal::new(None::<UiError>);
    let editing = RwSignal::new(None::<(String, String)>);
    let import = move |files: Vec<web_sys::File>| {
        spawn_local(async move {
            for file in files {
                let result = async {
                    let bytes = crate::app::ui::widgets::file_bytes(&file).await?;
                    let id = Identity::from_bytes(&file.name(), bytes.clone())
                        .await
                        .map_err(|e| UiError::new(ErrorKind::BadIdentity, e.to_string()))?;
                    let (s, _held) = library().await?;
                    // Storage, not this tab's list: another tab may have stored it since.
                    if s.size(&identity_path(&id.token)).await?.is_some() {
                        return Err(UiError::new(
                            ErrorKind::Exists,
                            format!("<{}> exists already: rename or delete it first.", id.token),
                        ));
                    }
                    s.write(&identity_path(&id.token), &bytes).await?;
                    Ok(())
                }
                .await;
                error.set(result.err());
            }
            load_list(ctx).await;
        })
    };
    let rename = move |old: String, new: String| {
        spawn_local(async move {
            let new = new.trim().to_string();
            let result = async {
                if !is_placeholder_name(&new) {
                    return Err(UiError::new(
                        ErrorKind::BadIdentity,
                        format!("Names are {PLACEHOLDER_NAME_RULE}."),
                    ));
                }
                let (s, _held) = library().await?;
                if s.size(&identity_path(&new)).await?.is_some() {
                    return Err(UiError::new(
                        ErrorKind::Exists,
                        format!("<{new}> exists already."),
                    ));
                }
                let bytes = s.read(&identity_path(&old)).await?;
                let mut id = Identity::from_bytes(&old, bytes)
                    .await
                    .map_err(|e| UiError::new(ErrorKind::BadIdentity, e.to_string()))?;
                id.token = new.clone();
                let out = id
                    .to_bytes()
                    .map_err(|e| UiError::new(ErrorKind::BadIdentity, e.to_string()))?;
                // Written before the old one goes, so a failure loses nothing.
                s.write(&identity_path(&new), &out).await?;
                s.remove(&identity_path(&old)).await?;
                Ok(())
            }
            .await;
            error.set(result.err());
            editing.set(None);
            load_list(ctx).await;
        })
    };
    let delete = move |token: String| {
        let sure = web_sys::window()
            .and_then(|w| {
                w.confirm_with_message(&format!(
                    "Delete <{token}>? Export it first to keep a copy."
                ))
                .ok()
            })
            .unwrap_or(false);
        if sure {
            spawn_local(async move {
                if let Ok((s, _held)) = library().await {
                    let _ = s.remove(&identity_path(&token)).await;
                }
                load_list(ctx).await;
            })
        }
    };
    view! {
        <h3>"Your identities"</h3>
        <ul class="identities" data-testid="identity-list">
            <For
                each=move || ctx.identities.get()
                key=|e| (e.token.clone(), e.url.clone())
                children=move |e: IdentityEntry| {
                    let (t1, t2, t3) = (e.token.clone(), e.token.clone(), e.token.clone());
                    view! {
                        <li data-testid="identity-item" data-token=e.token.clone()>
                            {move || match editing.get() {
                                Some((old, draft)) if old == t1 => view! {
                                    <form class="inline" on:submit=move |ev| {
                                        ev.prevent_default();
                                        rename(old.clone(), draft.clone());
                                    }>
                                        <input
                                            type="text"
                                            data-testid="identity-rename-input"
                                            prop:value=editing.get().map(|e| e.1).unwrap_or_default()
                                            on:input=move |ev| editing.update(|e| if let Some(e) = e { e.1 = event_target_value(&ev) })
                                        />
                                        <button type="submit">"Save"</button>
                                    </form>
                                }.into_any(),
                                _ => view! { <strong class="token">{format!("<{t1}>")}</strong> }.into_any(),
                            }}
                            <span class="muted">
                                {format!(" {} · {} · {} steps ", e.class_word, e.family, e.steps)}
                            </span>
                            <a
                                class="button"
                                data-testid="identity-export"
                                href=e.url.clone()
                                download=format!("{}.safetensors", e.token)
                            >
                                "Export"
                            </a>
                            <button
                                data-testid="identity-rename"
                                on:click=move |_| editing.set(Some((t2.clone(), t2.clone())))
                            >
                                "Rename"
                            </button>
                            <button
                                class="danger"
                                data-testid="identity-delete"
                                on:click=move |_| delete(t3.clone())
                            >
                                "Delete"
                            </button>
                        </li>
                    }
                }
            />
        </ul>
        {move || ctx.identities.with(Vec::is_empty).then(|| view! {
            <p class="muted">"None yet. Learned identities are kept in this browser; export them to keep a copy."</p>
        })}
        <label class="link">
            "Import an identity (.safetensors)"
            <input
                type="file"
                class="hidden"
                accept=".safetensors"
                multiple
                data-testid="identity-import"
                on:change=move |ev| import(input_files(&ev))
            />
        </label>
        {move || error.get().map(|error| view! { <ErrorBox error testid="identity-error" /> })}
    }
}
