//! Where models come from: the presets, what a typed address means (a Hub repository, a
//! diffusers folder, one `.safetensors` file), which files a folder needs, and the manifest
//! that records a model in the browser's storage. Plain data, so it is tested natively.

use serde::{Deserialize, Serialize};

use crate::weights::{Component, Family};

/// A model offered in the model panel's list. Add entries here to offer more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// The name shown.
    pub name: &'static str,
    /// What users type for it: a Hub repository or any address [`ModelSource::parse`] takes.
    pub address: &'static str,
    /// Download the `*.fp16.safetensors` variant (half the bytes; the GPU may still compute in
    /// f32).
    pub fp16: bool,
    /// Size and download, shown beside the name.
    pub note: &'static str,
    /// The model family: its full-size config sizes the fit estimate before any download.
    pub family: Family,
    /// Its native image size in pixels.
    pub resolution: usize,
    /// Parameters of all its models (checked against the configs in the tests).
    pub params: u64,
    /// Elements of its largest tensor that loads as one buffer (the UNet's first up block's
    /// 2560-to-1280 3x3 convolution; the token tables load in row chunks).
    pub largest_tensor: u64,
    /// A VAE offered in place of the model's: SDXL's own overflows in f16 and is run in f32;
    /// the fp16-fix VAE runs in f16 (less memory, faster decoding).
    pub vae: Option<&'static str>,
}

/// The models the model panel offers.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "Stable Diffusion 1.5",
        address: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        fp16: true,
        note: "512 px, about 2.1 GB to download",
        family: Family::Sd1,
        resolution: 512,
        params: 1_066_235_307,
        largest_tensor: 1280 * 2560 * 3 * 3,
        vae: None,
    },
    Preset {
        name: "Stable Diffusion 2.1 base",
        address: "stabilityai/stable-diffusion-2-1-base",
        fp16: true,
        note: "512 px, about 2.6 GB to download",
        family: Family::Sd2,
        resolution: 512,
        params: 1_289_952_427,
        largest_tensor: 1280 * 2560 * 3 * 3,
        vae: None,
    },
    Preset {
        name: "Stable Diffusion XL base 1.0",
        address: "stabilityai/stable-diffusion-xl-base-1.0",
        fp16: true,
        note: "1024 px, about 6.9 GB to download; needs a GPU with 10 GB or more",
        family: Family::Sdxl,
        resolution: 1024,
        params: 3_468_837_867,
        largest_tensor: 1280 * 2560 * 3 * 3,
        vae: Some("madebyollin/sdxl-vae-fp16-fix"),
    },
];

const HUB: &str = "https://huggingface.co";

/// What a typed model address points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ModelSource {
    /// A diffusers folder; `base` ends with `/` and file paths are appended to it.
    Folder {
        /// The folder's address, ending with `/`.
        base: String,
    },
    /// One original-layout `.safetensors` checkpoint.
    SingleFile {
        /// The file's address.
        url: String,
    },
}

/// Why an address cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Nothing was typed.
    #[error("type a model address: a Hugging Face repository such as {example}, or the URL of a diffusers folder or of a .safetensors file", example = PRESETS[0].address)]
    Empty,
    #[error(
        "{0} is a PyTorch pickle file; SeFi Studio only opens .safetensors files, which cannot hide code. Most models publish one"
    )]
    /// A `.ckpt`/`.bin`/`.pt` pickle: refused, it can run code.
    Pickle(String),
    #[error(
        "`{0}` is not a web address (it should start with https://) or a Hub repository (owner/name)"
    )]
    /// Neither a URL nor an `owner/name` repository.
    NotAnAddress(String),
}

impl ModelSource {
    /// Understands, for the model-URL box:
    /// - `owner/name`: a repository on the Hugging Face Hub;
    /// - `https://huggingface.co/owner/name` (the repository's page) or its `/tree/main` page;
    /// - any URL ending in `.safetensors`: one single-file checkpoint;
    /// - any other URL: a diffusers folder (`unet/`, `vae/`, ... below it);
    /// - a path on this site (`/models/x/`), resolved against `origin`.
    pub fn parse(input: &str, origin: &str) -> Result<Self, SourceError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SourceError::Empty);
        }
        let path_part = s.split(['?', '#']).next().unwrap_or(s);
        let lower = path_part.to_ascii_lowercase();
        if [".ckpt", ".pt", ".pth", ".bin", ".pkl"]
            .iter()
            .any(|e| lower.ends_with(e))
        {
            return Err(SourceError::Pickle(s.into()));
        }
        let url = if s.starts_with("https://") || s.starts_with("http://") {
            s.to_string()
        } else if s.starts_with('/') {
            format!("{}{s}", origin.trim_end_matches('/'))
        } else if is_repo_id(s) {
            format!("{HUB}/{s}/resolve/main/")
        } else {
            return Err(SourceError::NotAnAddress(s.into()));
        };
        // A repository's page on the Hub: its files are under /resolve/main/.
        let url = match url.strip_prefix(&format!("{HUB}/")) {
            Some(rest) if !rest.contains("/resolve/") => {
                let repo: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
                match repo[..] {
                    [owner, name] | [owner, name, "tree", "main"] => {
                        format!("{HUB}/{owner}/{name}/resolve/main/")
                    }
                    _ => url,
                }
            }
            _ => url,
        };
        if lower.ends_with(".safetensors") {
            Ok(ModelSource::SingleFile { url })
        } else {
            let base = if url.ends_with('/') {
                url
            } else {
                format!("{url}/")
            };
            Ok(ModelSource::Folder { base })
        }
    }

    /// The address the cache is keyed by.
    pub fn address(&self) -> &str {
        match self {
            ModelSource::Folder { base } => base,
            ModelSource::SingleFile { url } => url,
        }
    }

    /// A short name for lists: the repository or the file name.
    pub fn display_name(&self) -> String {
        let a = self.address().trim_end_matches('/');
        if let Some(rest) = a.strip_prefix(&format!("{HUB}/")) {
            let parts: Vec<&str> = rest.split('/').collect();
            if parts.len() >= 2 && !a.ends_with(".safetensors") {
                return format!("{}/{}", parts[0], parts[1]);
            }
        }
        a.rsplit('/').next().unwrap_or(a).to_string()
    }

    /// The host the page must be allowed to connect to.
    pub fn host(&self) -> Option<&str> {
        let a = self.address();
        let rest = a.split_once("://")?.1;
        Some(rest.split(['/', '?', '#']).next().unwrap_or(rest))
    }
}

fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// One file a model needs, with the names it may have (the first that exists is taken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Names relative to the folder, in order of preference.
    pub candidates: Vec<String>,
    /// A model works without it (the defaults stand in).
    pub optional: bool,
    /// PyTorch pickle files that hold the same weights: never fetched or read, only named when
    /// they are all the folder has.
    pub pickles: Vec<String>,
}

impl Wanted {
    /// Why a folder without this file cannot be used; `pickle` is the pickle it has instead.
    pub fn missing(&self, folder: &str, pickle: Option<&str>, kind: ModelKind) -> String {
        match (pickle, kind) {
            (Some(p), _) => format!(
                "{folder} holds {p}, a PyTorch pickle file, and no {}. SeFi Studio only opens .safetensors files, which cannot hide code; most models publish them beside the pickles",
                self.candidates.join(" or ")
            ),
            (None, ModelKind::StableDiffusion) => format!(
                "{folder} is not a diffusers model folder: it has no {}. Give the folder that holds unet/, vae/ and text_encoder/, or a single .safetensors file",
                self.candidates.join(" or ")
            ),
            (None, ModelKind::Clip) => format!(
                "{folder} is not a CLIP model folder: it has no {}. Give the folder of {CLIP_ADDRESS} as the Hub has it",
                self.candidates.join(" or ")
            ),
        }
    }
}

/// The weights of one model of a folder: one file in the preferred variant first, else the
/// index of its shards (whose shards [`shard_files`] then names).
fn weights(component: Component, fp16_first: bool) -> Wanted {
    let stem = component.weights_stem();
    let path = |file: &str| component.path(&format!("{stem}{file}"));
    let (full, half) = (path(".safetensors"), path(".fp16.safetensors"));
    let (full_index, half_index) = (
        path(".safetensors.index.json"),
        path(".safetensors.index.fp16.json"),
    );
    Wanted {
        candidates: if fp16_first {
            vec![half, full, half_index, full_index]
        } else {
            vec![full, half, full_index, half_index]
        },
        optional: false,
        pickles: component.pickle_files().to_vec(),
    }
}

fn file(path: &str, optional: bool) -> Wanted {
    Wanted {
        candidates: vec![path.to_string()],
        optional,
        pickles: Vec::new(),
    }
}

/// Whether a shard index was picked: its shards are needed too.
pub fn is_shard_index(path: &str) -> bool {
    path.ends_with(".safetensors.index.json") || path.ends_with(".safetensors.index.fp16.json")
}

/// The shards a stored index (`index_path`, e.g. `unet/diffusion_pytorch_model.safetensors.index.json`)
/// lists, each needed, beside the index.
pub fn shard_files(index_path: &str, index_text: &str) -> Result<Vec<Wanted>, String> {
    let names = crate::weights::checkpoint::shard_names(index_path, index_text)
        .map_err(|e| e.to_string())?;
    Ok(names
        .into_iter()
        .map(|n| match index_path.rsplit_once('/') {
            Some((dir, _)) => file(&format!("{dir}/{n}"), false),
            None => file(&n, false),
        })
        .collect())
}

/// Whether `unet/config.json` is an SDXL UNet (`addition_embed_type: text_time`), whose folder
/// also has a second text encoder and tokenizer ([`xl_files`]).
pub fn unet_is_xl(config: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(config)
        .is_ok_and(|v| v["addition_embed_type"] == "text_time")
}

/// The files SDXL folders add: the second text encoder and its tokenizer.
pub fn xl_files(fp16_first: bool) -> Vec<Wanted> {
    vec![
        file("text_encoder_2/config.json", false),
        file("tokenizer_2/vocab.json", true),
        file("tokenizer_2/merges.txt", true),
        file("tokenizer_2/special_tokens_map.json", true),
        file("tokenizer_2/tokenizer_config.json", true),
        weights(Component::TextEncoder2, fp16_first),
    ]
}

/// The files of a diffusers folder that SeFi Studio reads, weights in the preferred variant
/// first (SDXL folders add [`xl_files`], sharded weights their [`shard_files`]). Everything
/// else a published folder holds (`model_index.json`, `safety_checker/`,
/// `feature_extractor/`, `.bin` pickles, `.ckpt` files beside it) is never fetched.
pub fn folder_files(fp16_first: bool) -> Vec<Wanted> {
    let weights = |component| weights(component, fp16_first);
    vec![
        file("unet/config.json", false),
        file("text_encoder/config.json", false),
        file("vae/config.json", false),
        file("scheduler/scheduler_config.json", true),
        file("tokenizer/vocab.json", true),
        file("tokenizer/merges.txt", true),
        file("tokenizer/special_tokens_map.json", true),
        file("tokenizer/tokenizer_config.json", true),
        weights(Component::TextEncoder),
        weights(Component::Unet),
        weights(Component::Vae),
    ]
}

/// The CLIP model the model panel offers for prompt fidelity: the one CLIP-T is reported with.
pub const CLIP_ADDRESS: &str = "openai/clip-vit-large-patch14";

/// The files of a transformers `CLIPModel` folder that SeFi Studio reads (the tokenizer files
/// are optional: the bundled vocabulary is the same). Its pickles and TensorFlow and Flax
/// weights are never fetched.
pub fn clip_files() -> Vec<Wanted> {
    vec![
        file("config.json", false),
        file("preprocessor_config.json", true),
        file("vocab.json", true),
        file("merges.txt", true),
        file("special_tokens_map.json", true),
        file("tokenizer_config.json", true),
        weights(Component::Clip, false),
    ]
}

/// What a stored model is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A Stable Diffusion model: a diffusers folder or a single file.
    #[default]
    StableDiffusion,
    /// A CLIP model that scores prompt fidelity (CLIP-T): a transformers folder.
    Clip,
}

impl ModelKind {
    /// The files of a folder of this kind, weights in the preferred variant first.
    pub fn folder_files(self, fp16_first: bool) -> Vec<Wanted> {
        match self {
            ModelKind::StableDiffusion => folder_files(fp16_first),
            ModelKind::Clip => clip_files(),
        }
    }
}

/// A stable name for a model's storage folder: FNV-1a of its address.
pub fn model_id(address: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Files are stored in parts of this size: a part is written whole and then never touched, so
/// an interrupted download resumes at the last finished part without rewriting what is there.
pub const PART_SIZE: u64 = 64 << 20;

/// One stored file of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Path relative to the model (`unet/diffusion_pytorch_model.safetensors`, or `model.safetensors`
    /// for a single file).
    pub path: String,
    /// Where it came from (`None`: the user's own file).
    pub url: Option<String>,
    /// Size in bytes, once known.
    pub size: Option<u64>,
    /// All bytes are stored.
    pub complete: bool,
}

impl StoredFile {
    /// Number of parts a file of `size` bytes is stored in.
    pub fn parts(size: u64) -> u64 {
        size.div_ceil(PART_SIZE).max(1)
    }
}

/// A model in storage: `models/<id>/manifest.json`, beside its files' parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The folder under `models/`.
    pub id: String,
    /// What it is for (manifests written before CLIP models were stored have none: SD).
    #[serde(default)]
    pub kind: ModelKind,
    /// The name shown.
    pub name: String,
    /// The address it was loaded from, or `local:<name>` for the user's files.
    pub address: String,
    /// One original-layout file rather than a diffusers folder.
    pub single_file: bool,
    /// Weights were asked for in their fp16 variant (a resumed download keeps to it).
    #[serde(default)]
    pub fp16: bool,
    /// The address of the VAE used in place of the model's (its `vae/` files come from there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// The files it needs, with what is stored of each.
    pub files: Vec<StoredFile>,
    /// Every needed file is stored.
    pub complete: bool,
    /// Milliseconds since the epoch of the last successful load onto a GPU (0: never), for
    /// "load the last model" on the next visit.
    pub last_used: f64,
}

impl Manifest {
    /// The known size of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.size).sum()
    }

    /// The file at `path` (relative to the model).
    pub fn file(&self, path: &str) -> Option<&StoredFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Whether the page's Content-Security-Policy lets it connect to `url`: its `connect-src`
/// (or `default-src`) list against the URL's scheme and host. Checked before a download so
/// that a refused host gets an explanation instead of an opaque network failure.
pub fn csp_allows(policy: &str, url: &str, page_origin: &str) -> bool {
    let directive = |name: &str| {
        policy
            .split(';')
            .map(str::trim)
            .find_map(|d| d.strip_prefix(name).map(str::trim))
            .map(str::to_string)
    };
    let Some(sources) = directive("connect-src ").or_else(|| directive("default-src ")) else {
        return true;
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let origin = format!("{scheme}://{host}");
    sources.split_whitespace().any(|s| match s {
        "'self'" => origin == page_origin.trim_end_matches('/'),
        "*" => true,
        s => match s.split_once("://") {
            Some((sch, h)) if sch == scheme => match h.strip_prefix("*.") {
                Some(suffix) => {
                    host.ends_with(&format!(".{suffix}")) && host.len() > suffix.len() + 1
                }
                None => h.trim_end_matches('/') == host,
            },
            _ => false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "http://127.0.0.1:8080";

    #[test]
    fn understands_addresses() {
        let hub = ModelSource::parse("stable-diffusion-v1-5/stable-diffusion-v1-5", ORIGIN);
        assert_eq!(
            hub,
            Ok(ModelSource::Folder {
                base: "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/".into()
            })
        );
        let page = ModelSource::parse(
            "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/tree/main",
            ORIGIN,
        );
        assert_eq!(page, hub);
        assert_eq!(
            hub.unwrap().display_name(),
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        );
        let single = ModelSource::parse("/fixtures/tiny-sd1.safetensors", ORIGIN).unwrap();
        assert_eq!(
            single,
            ModelSource::SingleFile {
                url: "http://127.0.0.1:8080/fixtures/tiny-sd1.safetensors".into()
            }
        );
        assert_eq!(single.display_name(), "tiny-sd1.safetensors");
        assert_eq!(single.host(), Some("127.0.0.1:8080"));
        let folder = ModelSource::parse("http://127.0.0.1:8080/fixtures/tiny-sd1", ORIGIN).unwrap();
        assert_eq!(folder.address(), "http://127.0.0.1:8080/fixtures/tiny-sd1/");
        assert_eq!(folder.display_name(), "tiny-sd1");
        assert!(matches!(
            ModelSource::parse("https://x.org/m/model.ckpt", ORIGIN),
            Err(SourceError::Pickle(_))
        ));
        assert_eq!(ModelSource::parse("  ", ORIGIN), Err(SourceError::Empty));
        assert!(matches!(
            ModelSource::parse("just words", ORIGIN),
            Err(SourceError::NotAnAddress(_))
        ));
    }

    #[test]
    fn folder_files_prefer_the_chosen_variant() {
        let files = folder_files(true);
        let unet = files
            .iter()
            .find(|w| w.candidates[0].starts_with("unet/diffusion"))
            .unwrap();
        assert_eq!(
            unet.candidates,
            [
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                "unet/diffusion_pytorch_model.safetensors.index.json",
            ]
        );
        assert!(!unet.optional);
        assert_eq!(
            folder_files(false).iter().filter(|w| !w.optional).count(),
            6
        );
    }

    #[test]
    fn published_folders_fetch_only_what_is_used() {
        let all: Vec<String> = folder_files(false)
            .into_iter()
            .flat_map(|w| w.candidates)
            .collect();
        for never in [
            "model_index.json",
            "safety_checker",
            "feature_extractor",
            ".bin",
            ".ckpt",
        ] {
            assert!(
                !all.iter().any(|f| f.contains(never)),
                "{never} would be fetched"
            );
        }
        let text = folder_files(false)
            .into_iter()
            .find(|w| w.candidates[0].starts_with("text_encoder/model"))
            .unwrap();
        assert_eq!(
            text.pickles,
            [
                "text_encoder/pytorch_model.bin",
                "text_encoder/pytorch_model.fp16.bin"
            ]
        );
        let sd = ModelKind::StableDiffusion;
        let why = text.missing("my-model/", Some("text_encoder/pytorch_model.bin"), sd);
        assert!(
            why.contains("text_encoder/pytorch_model.bin") && why.contains("pickle"),
            "{why}"
        );
        let why = text.missing("my-model/", None, sd);
        assert!(why.contains("text_encoder/model.safetensors"), "{why}");
    }

    #[test]
    fn clip_folders_fetch_their_weights_at_the_top() {
        let files = ModelKind::Clip.folder_files(true);
        let weights = files.iter().find(|w| !w.optional && w.pickles.len() == 2);
        let weights = weights.expect("the weights are needed");
        assert_eq!(
            weights.candidates,
            [
                "model.safetensors",
                "model.fp16.safetensors",
                "model.safetensors.index.json",
                "model.safetensors.index.fp16.json",
            ]
        );
        assert_eq!(
            weights.pickles,
            ["pytorch_model.bin", "pytorch_model.fp16.bin"]
        );
        let needed: Vec<&str> = files
            .iter()
            .filter(|w| !w.optional)
            .map(|w| w.candidates[0].as_str())
            .collect();
        assert_eq!(needed, ["config.json", "model.safetensors"]);
        let why = weights.missing("clip/", None, ModelKind::Clip);
        assert!(
            why.contains("not a CLIP model folder") && why.contains(CLIP_ADDRESS),
            "{why}"
        );
        let shards = shard_files(
            "model.safetensors.index.json",
            r#"{"weight_map": {"a": "model-00001-of-00001.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(shards[0].candidates, ["model-00001-of-00001.safetensors"]);
    }

    #[test]
    fn manifests_stored_before_clip_models_are_stable_diffusion() {
        let old = r#"{"id": "a", "name": "m", "address": "x", "single_file": true,
            "files": [], "complete": true, "last_used": 0}"#;
        let m: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.kind, ModelKind::StableDiffusion);
        let clip = Manifest {
            kind: ModelKind::Clip,
            ..m
        };
        let text = serde_json::to_string(&clip).unwrap();
        assert!(text.contains(r#""kind":"clip""#), "{text}");
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), clip);
    }

    #[test]
    fn sdxl_folders_add_their_second_encoder_and_shards() {
        let sd15 = r#"{"cross_attention_dim": 768}"#;
        let xl = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sd/configs/sdxl/unet/config.json"
        ))
        .unwrap();
        assert!(!unet_is_xl(sd15) && unet_is_xl(&xl) && !unet_is_xl("not json"));
        let files: Vec<String> = xl_files(true)
            .into_iter()
            .flat_map(|w| w.candidates)
            .collect();
        assert!(files.contains(&"text_encoder_2/config.json".to_string()));
        assert!(files.contains(&"text_encoder_2/model.fp16.safetensors".to_string()));
        assert!(files.contains(&"tokenizer_2/vocab.json".to_string()));

        let index = "unet/diffusion_pytorch_model.safetensors.index.json";
        assert!(is_shard_index(index) && !is_shard_index("unet/config.json"));
        let text = r#"{"metadata": {}, "weight_map": {
            "a": "diffusion_pytorch_model-00002-of-00002.safetensors",
            "b": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "c": "diffusion_pytorch_model-00001-of-00002.safetensors"}}"#;
        let shards: Vec<Vec<String>> = shard_files(index, text)
            .unwrap()
            .into_iter()
            .map(|w| {
                assert!(!w.optional);
                w.candidates
            })
            .collect();
        assert_eq!(
            shards,
            [
                ["unet/diffusion_pytorch_model-00001-of-00002.safetensors"],
                ["unet/diffusion_pytorch_model-00002-of-00002.safetensors"],
            ]
        );
        // An index may only name files beside it.
        let hostile = r#"{"weight_map": {"a": "../../other/model.safetensors"}}"#;
        assert!(
            shard_files(index, hostile)
                .unwrap_err()
                .contains("not a file name")
        );
        assert!(shard_files(index, "{}").is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(model_id("a"), model_id("a"));
        assert_ne!(model_id("a/"), model_id("a"));
        assert_eq!(model_id("").len(), 16);
        assert_eq!(StoredFile::parts(0), 1);
        assert_eq!(StoredFile::parts(PART_SIZE), 1);
        assert_eq!(StoredFile::parts(PART_SIZE + 1), 2);
    }

    #[test]
    fn reads_the_policy_like_the_browser() {
        let policy = "default-src 'none'; script-src 'self'; connect-src 'self' https://huggingface.co https://*.huggingface.co https://*.hf.co; img-src blob:";
        let ok = |u| csp_allows(policy, u, ORIGIN);
        assert!(ok(
            "http://127.0.0.1:8080/fixtures/tiny-sd1/unet/config.json"
        ));
        assert!(ok("https://huggingface.co/a/b/resolve/main/x"));
        assert!(ok("https://cdn-lfs-us-1.hf.co/x"));
        assert!(!ok("https://hf.co/x"), "a wildcard needs a subdomain");
        assert!(!ok("http://huggingface.co/x"), "the scheme must match");
        assert!(!ok("https://example.org/model.safetensors"));
        assert!(
            !ok("http://127.0.0.1:9999/x"),
            "another port is another origin"
        );
        assert!(!csp_allows(
            "default-src 'none'",
            "https://example.org/",
            ORIGIN
        ));
        assert!(csp_allows(
            "script-src 'self'",
            "https://example.org/",
            ORIGIN
        ));
    }
}
