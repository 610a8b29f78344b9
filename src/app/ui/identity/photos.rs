//! The photos to learn from: adding them (picker or drop), and the square of each to train on,
//! placed around the face the worker finds (the user can still move it, or pick another face).

use leptos::prelude::*;
use leptos::task::spawn_local;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{HtmlImageElement, ImageEncodeOptions, OffscreenCanvas};

use crate::app::protocol::{FACE_PHOTO_SIDE, Request, WorkerError};
use crate::app::ui::widgets::{
    ErrorBox, ErrorKind, UiError, blob_url_of, dropped_files, input_files, revoke,
};
use crate::app::ui::{Ctx, GpuState};
use crate::face::{Face, suggest_crop};
use serde_bytes::ByteBuf;

/// A photo the user added, with the square they chose (in the photo's pixels).
#[derive(Clone, Debug, PartialEq)]
pub struct PhotoEntry {
    key: u32,
    name: String,
    url: String,
    width: u32,
    height: u32,
    crop: (u32, u32, u32),
    faces: PhotoFaces,
    /// The user placed the square: a late answer about faces leaves it where it is.
    moved: bool,
}

/// What is known of a photo's faces.
#[derive(Clone, Debug, PartialEq)]
pub enum PhotoFaces {
    /// The worker is looking, in pixels this many times smaller than the photo's.
    Looking {
        /// The factor from the pixels sent back to the photo's.
        scale: f32,
    },
    /// The faces, in the photo's pixels, the most confident first (none: no face).
    Found(Vec<Face>),
    /// No GPU worker, or the face models could not load: the square is the user's to place.
    Unavailable,
}

/// The photo's pixels as the page shows it (its orientation applied), at most
/// [`FACE_PHOTO_SIDE`] on a side: width, height, RGB bytes, and the factor back to the photo.
fn pixels(img: &HtmlImageElement) -> Option<(u32, u32, Vec<u8>, f32)> {
    let (w, h) = (img.natural_width(), img.natural_height());
    let scale = (FACE_PHOTO_SIDE as f64 / w.max(h) as f64).min(1.0);
    let sw = ((w as f64 * scale).round() as u32).max(1);
    let sh = ((h as f64 * scale).round() as u32).max(1);
    let canvas = OffscreenCanvas::new(sw, sh).ok()?;
    let c2d: web_sys::OffscreenCanvasRenderingContext2d =
        canvas.get_context("2d").ok().flatten()?.dyn_into().ok()?;
    c2d.draw_image_with_html_image_element_and_dw_and_dh(img, 0.0, 0.0, sw as f64, sh as f64)
        .ok()?;
    let rgba = c2d
        .get_image_data(0.0, 0.0, sw as f64, sh as f64)
        .ok()?
        .data();
    let rgb = rgba
        .0
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    Some((sw, sh, rgb, w as f32 / sw as f32))
}

/// The worker that was asked about faces is gone: photos still waiting get no square
/// suggested (the user places it).
pub fn no_answer(ctx: Ctx) {
    ctx.photos.update(|photos| {
        for p in photos
            .iter_mut()
            .filter(|p| matches!(p.faces, PhotoFaces::Looking { .. }))
        {
            p.faces = PhotoFaces::Unavailable;
        }
    });
}

/// The worker's answer about a photo's faces: the square goes around the most confident one,
/// unless the user placed it already.
pub fn on_faces(ctx: Ctx, key: u32, faces: Result<Vec<Face>, WorkerError>) {
    ctx.photos.update(|photos| {
        let Some(p) = photos.iter_mut().find(|p| p.key == key) else {
            return;
        };
        // An answer nobody waits for any more (the worker was replaced) changes nothing.
        let PhotoFaces::Looking { scale } = p.faces else {
            return;
        };
        match faces {
            Ok(faces) => {
                let faces: Vec<Face> = faces
                    .into_iter()
                    .map(|f| Face {
                        score: f.score,
                        bbox: f.bbox.map(|v| v * scale),
                        keypoints: f.keypoints.map(|k| k.map(|v| v * scale)),
                    })
                    .collect();
                if let (Some(face), false) = (faces.first(), p.moved) {
                    p.crop = suggest_crop(face, p.width, p.height);
                }
                p.faces = PhotoFaces::Found(faces);
            }
            Err(e) => {
                web_sys::console::warn_1(&format!("no face search for {}: {e}", p.name).into());
                p.faces = PhotoFaces::Unavailable;
            }
        }
    });
}

async fn decoded(url: &str) -> Option<HtmlImageElement> {
    let img = HtmlImageElement::new().ok()?;
    img.set_src(url);
    JsFuture::from(img.decode()).await.ok()?;
    Some(img)
}

/// The chosen square as a PNG, at most 1024 px (the worker resizes it to the training size).
pub async fn crop_png(p: &PhotoEntry) -> Result<Vec<u8>, UiError> {
    let fail = |m: &str| UiError::new(ErrorKind::BadPhoto, format!("{}: {m}", p.name));
    let img = decoded(&p.url)
        .await
        .ok_or_else(|| fail("it can no longer be read"))?;
    let (x, y, s) = p.crop;
    let side = s.min(1024);
    let canvas = OffscreenCanvas::new(side, side).map_err(|_| fail("no canvas"))?;
    let c2d: web_sys::OffscreenCanvasRenderingContext2d = canvas
        .get_context("2d")
        .ok()
        .flatten()
        .and_then(|c| c.dyn_into().ok())
        .ok_or_else(|| fail("no 2D canvas"))?;
    c2d.draw_image_with_html_image_element_and_sw_and_sh_and_dx_and_dy_and_dw_and_dh(
        &img,
        x as f64,
        y as f64,
        s as f64,
        s as f64,
        0.0,
        0.0,
        side as f64,
        side as f64,
    )
    .map_err(|_| fail("cannot draw it"))?;
    let opts = ImageEncodeOptions::new();
    opts.set_type("image/png");
    let promise = canvas
        .convert_to_blob_with_options(&opts)
        .map_err(|_| fail("cannot encode it"))?;
    let blob: web_sys::Blob = JsFuture::from(promise)
        .await
        .map_err(|_| fail("cannot encode it"))?
        .unchecked_into();
    crate::store::read_blob(&p.name, &blob)
        .await
        .map_err(UiError::from)
}

/// The drop zone with its file picker, the photos with their squares, and why a file was
/// refused.
#[component]
pub fn PhotoPicker(photos: RwSignal<Vec<PhotoEntry>>) -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let photo_error = RwSignal::new(None::<UiError>);
    let next_key = StoredValue::new(0u32);
    let add = move |files: Vec<web_sys::File>| {
        for file in files {
            spawn_local(async move {
                let url = blob_url_of(&file);
                match decoded(&url).await {
                    Some(img) if img.natural_width() > 0 => {
                        let (w, h) = (img.natural_width(), img.natural_height());
                        let s = w.min(h);
                        let key = next_key.get_value();
                        next_key.set_value(key + 1);
                        photo_error.set(None);
                        // The worker finds the faces (it holds the GPU and the models).
                        let gpu = matches!(ctx.gpu.get_untracked(), GpuState::Ready(_));
                        let sent = gpu.then(|| pixels(&img)).flatten();
                        photos.update(|p| {
                            p.push(PhotoEntry {
                                key,
                                name: file.name(),
                                url,
                                width: w,
                                height: h,
                                crop: ((w - s) / 2, (h - s) / 2, s),
                                faces: match &sent {
                                    Some((.., scale)) => PhotoFaces::Looking { scale: *scale },
                                    None => PhotoFaces::Unavailable,
                                },
                                moved: false,
                            })
                        });
                        if let Some((width, height, rgb, _)) = sent {
                            ctx.send(Request::FindFaces {
                                key,
                                width: width as usize,
                                height: height as usize,
                                rgb: ByteBuf::from(rgb),
                            });
                        }
                    }
                    _ => {
                        revoke(&url);
                        photo_error.set(Some(UiError::new(
                            ErrorKind::BadPhoto,
                            format!(
                                "{} could not be read as an image. Use a JPEG, PNG or WebP photo.",
                                file.name()
                            ),
                        )));
                    }
                }
            });
        }
    };

    view! {
        <div
            class="drop photos"
            on:dragover=|ev: web_sys::DragEvent| ev.prevent_default()
            on:drop=move |ev: web_sys::DragEvent| add(dropped_files(&ev))
        >
            <label class="button">
                "Add photos"
                <input
                    type="file"
                    class="hidden"
                    accept="image/*"
                    multiple
                    data-testid="photo-input"
                    on:change=move |ev| add(input_files(&ev))
                />
            </label>
            <span class="muted">" or drop them here. Click a photo to move its square."</span>
            <div class="photo-grid">
                <For
                    each=move || photos.get()
                    key=|p| p.key
                    children=move |p: PhotoEntry| view! { <PhotoCrop key=p.key photos /> }
                />
            </div>
        </div>
        {move || photo_error.get().map(|error| view! { <ErrorBox error testid="photo-error" /> })}
    }
}

/// One photo with its square: a click centres the square there, the slider sizes it.
#[component]
fn PhotoCrop(key: u32, photos: RwSignal<Vec<PhotoEntry>>) -> impl IntoView {
    let entry = move || photos.with(|p| p.iter().find(|e| e.key == key).cloned());
    let Some(first) = entry() else {
        return ().into_any();
    };
    let (w, h) = (first.width, first.height);
    let set_crop = move |f: &dyn Fn((u32, u32, u32)) -> (u32, u32, u32)| {
        photos.update(|p| {
            if let Some(e) = p.iter_mut().find(|e| e.key == key) {
                let (x, y, s) = f(e.crop);
                let s = s.clamp(8, w.min(h));
                e.crop = (x.min(w - s), y.min(h - s), s);
                e.moved = true;
            }
        })
    };
    let faces = move || match entry().map(|e| e.faces) {
        Some(PhotoFaces::Found(f)) => f,
        _ => Vec::new(),
    };
    // A click on a face's box puts the square around that face.
    let choose = move |i: usize| {
        photos.update(|p| {
            if let Some(e) = p.iter_mut().find(|e| e.key == key)
                && let PhotoFaces::Found(f) = &e.faces
                && let Some(face) = f.get(i)
            {
                e.crop = suggest_crop(face, w, h);
                e.moved = true;
            }
        })
    };
    let note = move || match entry().map(|e| e.faces) {
        Some(PhotoFaces::Looking { .. }) => {
            Some(("face-looking", "Looking for a face…".to_string()))
        }
        Some(PhotoFaces::Found(f)) => Some(match f.len() {
            0 => (
                "no-face",
                "No face found: place the square by hand (as for a pet or a thing).".to_string(),
            ),
            1 => ("face-found", "The square is around the face.".to_string()),
            n => (
                "face-found",
                format!("{n} faces: click one to train on it."),
            ),
        }),
        _ => None,
    };
    let pct = move |v: u32, of: u32| format!("{:.3}%", v as f64 / of as f64 * 100.0);
    // Set through the CSSOM (style:...), which the CSP allows, not as a style attribute.
    let crop = move || entry().map(|e| e.crop).unwrap_or((0, 0, 0));
    let click = move |ev: web_sys::MouseEvent| {
        let Some(target) = ev
            .current_target()
            .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
        else {
            return;
        };
        let rect = target.get_bounding_client_rect();
        let fx = (ev.client_x() as f64 - rect.left()) / rect.width().max(1.0);
        let fy = (ev.client_y() as f64 - rect.top()) / rect.height().max(1.0);
        set_crop(&|(_, _, s)| {
            let cx = (fx * w as f64) as i64 - s as i64 / 2;
            let cy = (fy * h as f64) as i64 - s as i64 / 2;
            (cx.max(0) as u32, cy.max(0) as u32, s)
        });
    };
    let remove = move |_| {
        photos.update(|p| {
            if let Some(i) = p.iter().position(|e| e.key == key) {
                revoke(&p[i].url);
                p.remove(i);
            }
        })
    };
    view! {
        <figure class="photo" data-testid="photo-crop">
            <div class="crop-area" on:click=click>
                <img src=first.url.clone() alt=first.name.clone() draggable="false" />
                <div
                    class="crop-square"
                    data-testid="crop-square"
                    data-crop=move || {
                        let (x, y, s) = crop();
                        format!("{x},{y},{s}")
                    }
                    style:left=move || pct(crop().0, w)
                    style:top=move || pct(crop().1, h)
                    style:width=move || pct(crop().2, w)
                    style:height=move || pct(crop().2, h)
                ></div>
                {move || {
                    faces()
                        .into_iter()
                        .enumerate()
                        .map(|(i, f)| {
                            let [x0, y0, x1, y1] = f.bbox.map(|v| v.max(0.0) as u32);
                            view! {
                                <button
                                    class="face-box"
                                    data-testid="face-box"
                                    title=format!("Face {} ({:.0}% sure): train on it", i + 1, f.score * 100.0)
                                    aria-label=format!("Train on face {}", i + 1)
                                    style:left=pct(x0, w)
                                    style:top=pct(y0, h)
                                    style:width=pct(x1.saturating_sub(x0), w)
                                    style:height=pct(y1.saturating_sub(y0), h)
                                    on:click=move |ev| {
                                        ev.stop_propagation();
                                        choose(i);
                                    }
                                ></button>
                            }
                        })
                        .collect_view()
                }}
            </div>
            {move || note().map(|(testid, text)| view! { <p class="muted face-note" data-testid=testid>{text}</p> })}
            <figcaption>
                <input
                    type="range"
                    min="8"
                    max=w.min(h)
                    aria-label="Square size"
                    prop:value=move || entry().map(|e| e.crop.2).unwrap_or(0).to_string()
                    on:input=move |ev| {
                        if let Ok(s) = event_target_value(&ev).parse::<u32>() {
                            set_crop(&|(x, y, old)| {
                                let grow = (s as i64 - old as i64) / 2;
                                (
                                    (x as i64 - grow).max(0) as u32,
                                    (y as i64 - grow).max(0) as u32,
                                    s,
                                )
                            })
                        }
                    }
                />
                <button class="link" on:click=remove aria-label="Remove photo">"Remove"</button>
            </figcaption>
        </figure>
    }
    .into_any()
}
