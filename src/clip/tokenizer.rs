//! CLIP's byte-level BPE tokenizer, computing what transformers' `CLIPTokenizer` computes
//! (its path without `ftfy`: BERT-style clean-up, NFC, lower-casing), plus placeholders.
//!
//! A placeholder such as `<alice>` never goes through BPE: it takes exactly one position, and
//! the caller splices a learned embedding in there.

use std::collections::HashMap;
use std::io::Read;
use std::sync::OnceLock;

use regex::Regex;
use unicode_general_category::{GeneralCategory, get_general_category};
use unicode_normalization::UnicodeNormalization;

use crate::weights::{TokenizerSource, WeightsError};

/// Positions the text encoder sees: start token, 75 prompt tokens, end token.
pub const CONTEXT_LENGTH: usize = 77;
/// The start token, first of every encoded prompt.
pub const START_OF_TEXT: &str = "<|startoftext|>";
/// The end token, after the prompt; SD 1.x also pads with it.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// OpenAI CLIP's BPE merges (MIT), as shipped in the `openai-clip` package. Used when a model
/// comes without its own `tokenizer/` folder (single-file checkpoints).
const OPENAI_MERGES_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 48,894 merges: 256 bytes + 256 end-of-word bytes + merges + 2 specials
/// = 49,408 tokens.
const OPENAI_MERGE_COUNT: usize = 49_408 - 512 - 2;

/// Why a model's tokenizer files cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// `vocab.json` is not valid JSON mapping tokens to ids; the message is the parser's.
    #[error("tokenizer vocab.json is not a JSON object of token -> id: {0}")]
    BadVocab(String),
    /// A line of `merges.txt` is not a pair of tokens.
    #[error("tokenizer merges.txt line {line} is not two tokens separated by a space: `{text}`")]
    BadMerge {
        /// The line number, counting from 1.
        line: usize,
        /// The line as it is in the file.
        text: String,
    },
    /// The vocabulary lacks the start, end or pad token it must have.
    #[error("the tokenizer vocabulary has no `{0}` token")]
    MissingToken(String),
}

/// One unit of an encoded prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// A vocabulary token's id.
    Id(u32),
    /// `<name>` in the prompt; the name without angle brackets.
    Placeholder(String),
}

/// A prompt ready for the text encoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly [`CONTEXT_LENGTH`] ids: start, prompt, end, padding. At a placeholder position
    /// the id is the start token's, a stand-in for the embedding the caller splices in.
    pub ids: Vec<u32>,
    /// Position in `ids` and name of each placeholder that fitted.
    pub placeholders: Vec<(usize, String)>,
    /// Position of the end token (where CLIP's pooled output is read).
    pub end_position: usize,
    /// How many prompt tokens did not fit and were cut; callers warn about them.
    pub truncated: usize,
}

/// CLIP's tokenizer: vocabulary, BPE merges and special tokens of one model.
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// "first second" -> merge rank (lower merges first).
    ranks: HashMap<String, usize>,
    byte_encoder: [char; 256],
    /// Texts that transformers treats as added tokens and splits out before anything else,
    /// longest first: the start and end tokens and the pad token. (So with SD 2.x's pad token
    /// `!`, every "!" in a prompt becomes the pad id, exactly as in diffusers.)
    specials: Vec<(String, u32)>,
    start: u32,
    end: u32,
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.encoder.len())
            .field("merges", &self.ranks.len())
            .field("pad", &self.pad)
            .finish()
    }
}

impl ClipTokenizer {
    /// The tokenizer a checkpoint names: its own files, or the bundled vocabulary.
    pub fn from_source(source: &TokenizerSource) -> Result<Self, WeightsError> {
        match source {
            TokenizerSource::Bundled { pad_token } => Ok(Self::openai(pad_token)),
            TokenizerSource::Texts {
                vocab,
                merges,
                pad_token,
            } => Self::from_files(vocab, merges, pad_token).map_err(|e| WeightsError::Config {
                file: "tokenizer/vocab.json".into(),
                reason: e.to_string(),
            }),
            TokenizerSource::Files {
                vocab,
                merges,
                pad_token,
            } => {
                let read = |p: &String| {
                    std::fs::read_to_string(p).map_err(|e| WeightsError::Io {
                        file: p.clone(),
                        reason: e.to_string(),
                    })
                };
                Self::from_files(&read(vocab)?, &read(merges)?, pad_token).map_err(|e| {
                    WeightsError::Config {
                        file: vocab.clone(),
                        reason: e.to_string(),
                    }
                })
            }
        }
    }

    /// From a model's `tokenizer/vocab.json` and `tokenizer/merges.txt`. `pad_token` is the
    /// `pad_token` of its `tokenizer_config.json`: `<|endoftext|>` for SD 1.x, `!` for SD 2.x
    /// and SDXL's second tokenizer.
    pub fn from_files(
        vocab_json: &str,
        merges_txt: &str,
        pad_token: &str,
    ) -> Result<Self, TokenizerError> {
        let encoder: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| TokenizerError::BadVocab(e.to_string()))?;
        let mut merges = Vec::new();
        for (n, line) in merges_txt.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(TokenizerError::BadMerge {
                        line: n + 1,
                        text: line.to_string(),
                    });
                }
            }
        }
        Self::new(encoder, merges, pad_token)
    }

    /// OpenAI CLIP's vocabulary, built into the binary; identical to the `tokenizer/` folders
    /// of SD 1.x and 2.x.
    pub fn openai(pad_token: &str) -> Self {
        static MERGES: OnceLock<Vec<(String, String)>> = OnceLock::new();
        let merges = MERGES.get_or_init(|| {
            let mut text = String::new();
            flate2::read::GzDecoder::new(OPENAI_MERGES_GZ)
                .read_to_string(&mut text)
                .expect("the bundled merges file is valid gzip'd UTF-8");
            text.lines()
                .skip(1)
                .take(OPENAI_MERGE_COUNT)
                .map(|l| {
                    let (a, b) = l.split_once(' ').expect("bundled merges are pairs");
                    (a.to_string(), b.to_string())
                })
                .collect()
        });
        // vocab = bytes, bytes + "</w>", merged pairs, specials: CLIP's SimpleTokenizer order.
        let bytes = bytes_to_unicode();
        let mut order = BYTE_ORDER
            .iter()
            .map(|&b| bytes[b as usize].to_string())
            .collect::<Vec<_>>();
        order.extend(
            BYTE_ORDER
                .iter()
                .map(|&b| format!("{}</w>", bytes[b as usize])),
        );
        order.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        order.push(START_OF_TEXT.into());
        order.push(END_OF_TEXT.into());
        let encoder = order.into_iter().zip(0u32..).collect();
        Self::new(encoder, merges.clone(), pad_token).expect("the bundled vocabulary is complete")
    }

    fn new(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad_token: &str,
    ) -> Result<Self, TokenizerError> {
        let id = |t: &str| {
            encoder
                .get(t)
                .copied()
                .ok_or_else(|| TokenizerError::MissingToken(t.to_string()))
        };
        let (start, end, pad) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?, id(pad_token)?);
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(rank, (a, b))| (format!("{a} {b}"), rank))
            .collect();
        let decoder = encoder.iter().map(|(k, &v)| (v, k.clone())).collect();
        let mut specials = vec![
            (START_OF_TEXT.to_string(), start),
            (END_OF_TEXT.to_string(), end),
        ];
        if pad != start && pad != end {
            specials.push((pad_token.to_string(), pad));
        }
        specials.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
        Ok(Self {
            encoder,
            decoder,
            ranks,
            byte_encoder: bytes_to_unicode(),
            specials,
            start,
            end,
            pad,
        })
    }

    /// The id of [`START_OF_TEXT`].
    pub fn start_id(&self) -> u32 {
        self.start
    }

    /// The id of [`END_OF_TEXT`].
    pub fn end_id(&self) -> u32 {
        self.end
    }

    /// The id that fills the positions after the end token.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Number of tokens in the vocabulary (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// The id of a text that is one token (a class word such as "person"), if it is one.
    pub fn single_token(&self, word: &str) -> Option<u32> {
        match self.encode(word).as_slice() {
            [Piece::Id(id)] => Some(*id),
            _ => None,
        }
    }

    /// The prompt's tokens without start, end or padding.
    pub fn encode(&self, text: &str) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut rest = 0;
        for (whole, name) in placeholder_spans(text) {
            self.encode_plain(&text[rest..whole.start], &mut pieces);
            pieces.push(Piece::Placeholder(name.to_string()));
            rest = whole.end;
        }
        self.encode_plain(&text[rest..], &mut pieces);
        pieces
    }

    /// Start token, the prompt cut to fit, end token, padding: what the text encoder takes.
    pub fn tokenize(&self, text: &str) -> Tokens {
        let pieces = self.encode(text);
        let room = CONTEXT_LENGTH - 2;
        let truncated = pieces.len().saturating_sub(room);
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        let mut placeholders = Vec::new();
        ids.push(self.start);
        for piece in pieces.into_iter().take(room) {
            match piece {
                Piece::Id(id) => ids.push(id),
                Piece::Placeholder(name) => {
                    placeholders.push((ids.len(), name));
                    ids.push(self.start);
                }
            }
        }
        let end_position = ids.len();
        ids.push(self.end);
        ids.resize(CONTEXT_LENGTH, self.pad);
        Tokens {
            ids,
            placeholders,
            end_position,
            truncated,
        }
    }

    /// The text of ids, for messages ("… was cut: `in front of the`").
    pub fn decode(&self, ids: &[u32]) -> String {
        let byte_decoder: HashMap<char, u8> = self
            .byte_encoder
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut bytes = Vec::new();
        for id in ids {
            let Some(token) = self.decoder.get(id) else {
                continue;
            };
            if token == START_OF_TEXT || token == END_OF_TEXT {
                continue;
            }
            let (body, word_end) = match token.strip_suffix("</w>") {
                Some(body) => (body, true),
                None => (token.as_str(), false),
            };
            bytes.extend(body.chars().filter_map(|c| byte_decoder.get(&c)));
            if word_end {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }

    /// Splits out special tokens (leftmost, then longest), then encodes the text between.
    fn encode_plain(&self, mut text: &str, out: &mut Vec<Piece>) {
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| text.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            let Some((at, len, id)) = next else { break };
            self.encode_words(&text[..at], out);
            out.push(Piece::Id(id));
            text = &text[at + len..];
        }
        self.encode_words(text, out);
    }

    fn encode_words(&self, text: &str, out: &mut Vec<Piece>) {
        let text = basic_clean(text);
        for word in word_pattern().find_iter(&text) {
            let word = word.as_str();
            // Exact specials were split out already; these are other spellings that the
            // lower-casing turned into them ("<|EndOfText|>"), which transformers maps too.
            if word == START_OF_TEXT || word == END_OF_TEXT {
                out.push(Piece::Id(self.encoder[word]));
                continue;
            }
            let chars: String = word
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            for token in self.bpe(&chars) {
                // CLIPTokenizer maps unknown tokens to <|endoftext|>.
                out.push(Piece::Id(
                    self.encoder.get(&token).copied().unwrap_or(self.end),
                ));
            }
        }
    }

    /// Byte-pair merges of one word, lowest rank first, as `CLIPTokenizer.bpe`.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|p| {
                    self.ranks
                        .get(&format!("{} {}", p[0], p[1]))
                        .map(|&r| (r, p))
                })
                .min_by_key(|&(r, _)| r);
            let Some((_, pair)) = best else { break };
            let (first, second) = (pair[0].clone(), pair[1].clone());
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
            if symbols.len() == 1 {
                break;
            }
        }
        symbols
    }
}

/// A prompt as CLIP-T reads it: each `<name>` replaced by its identity's class word ("a photo
/// of <alice> in Paris" is scored as "a photo of woman in Paris"), or dropped where
/// `class_words` (identity name, class word) names no identity of that name.
pub fn plain_prompt(prompt: &str, class_words: &[(&str, &str)]) -> String {
    let mut out = prompt.to_string();
    for name in placeholders(prompt) {
        let word = class_words
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, w)| *w);
        out = out.replacen(&format!("<{name}>"), word, 1);
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The names of a prompt's `<name>` placeholders, in order, as [`ClipTokenizer::encode`]
/// finds them.
pub fn placeholders(text: &str) -> impl Iterator<Item = &str> {
    placeholder_spans(text).map(|(_, name)| name)
}

/// What an identity's name may be, in words: the names [`placeholders`] finds.
pub const PLACEHOLDER_NAME_RULE: &str =
    "letters a-z, digits and _ (and, after the first character, . and -)";

/// Whether `name` can be written as `<name>` in a prompt: the one rule for identity names, used
/// by the trainer, the command line and the page alike.
pub fn is_placeholder_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| name_start(&b)) && bytes.all(|b| name_rest(&b))
}

fn name_start(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || *b == b'_'
}

fn name_rest(b: &u8) -> bool {
    name_start(b) || matches!(b, b'.' | b'-')
}

/// Each `<name>` of a prompt: its byte range (brackets included) and the name. A name starts
/// with an ASCII letter, digit or `_` and goes on with those, `.` or `-` (the pattern
/// `<([A-Za-z0-9_][A-Za-z0-9_.\-]*)>`, scanned by hand so that the page, which only needs the
/// names, carries no regex engine).
fn placeholder_spans(text: &str) -> impl Iterator<Item = (std::ops::Range<usize>, &str)> {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while let Some(offset) = bytes[at..].iter().position(|&b| b == b'<') {
            let open = at + offset;
            let name_len = match bytes.get(open + 1) {
                Some(b) if name_start(b) => {
                    1 + bytes[open + 2..]
                        .iter()
                        .take_while(|b| name_rest(b))
                        .count()
                }
                _ => 0,
            };
            let close = open + 1 + name_len;
            at = open + 1;
            if name_len > 0 && bytes.get(close) == Some(&b'>') {
                at = close + 1;
                return Some((open..close + 1, &text[open + 1..close]));
            }
        }
        at = bytes.len();
        None
    })
}

/// `CLIPTokenizer.pat`.
fn word_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("valid pattern")
    })
}

/// transformers' `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`, which
/// `CLIPTokenizer` uses when `ftfy` is not installed: drop control characters, space out CJK
/// ideographs, NFC, lower-case, collapse whitespace.
fn basic_clean(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    let normalized: String = cleaned.nfc().collect();
    normalized
        .split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
        || get_general_category(c) == GeneralCategory::SpaceSeparator
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    )
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// Printable bytes first, in GPT-2's order, then the rest.
const BYTE_ORDER: [u8; 256] = {
    let mut order = [0u8; 256];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        if is_printable_byte(b as u8) {
            order[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    b = 0;
    while b < 256 {
        if !is_printable_byte(b as u8) {
            order[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    order
};

const fn is_printable_byte(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0;
    for b in 0..=255u8 {
        map[b as usize] = if is_printable_byte(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1() -> ClipTokenizer {
        ClipTokenizer::openai(END_OF_TEXT)
    }

    #[test]
    fn placeholders_are_the_ones_encode_finds() {
        let t = sd1();
        for prompt in [
            "a photo of <alice> and <bob_2> at 3<4 > 2",
            "x < alice > <|endoftext|> <a.b-c>",
            "no names here",
        ] {
            let encoded: Vec<String> = t
                .encode(prompt)
                .into_iter()
                .filter_map(|p| match p {
                    Piece::Placeholder(n) => Some(n),
                    Piece::Id(_) => None,
                })
                .collect();
            assert_eq!(
                placeholders(prompt).collect::<Vec<_>>(),
                encoded,
                "{prompt}"
            );
        }
        assert_eq!(
            placeholders("<alice> and <bob_2>").collect::<Vec<_>>(),
            ["alice", "bob_2"]
        );
    }

    #[test]
    fn known_prompt_gives_known_ids() {
        // transformers' CLIPTokenizer from the SD 1.5 tokenizer/ folder gives these ids.
        let t = sd1().tokenize("a photo of sks person");
        assert_eq!(t.ids[..7], [49406, 320, 1125, 539, 48136, 2533, 49407]);
        assert!(t.ids[7..].iter().all(|&id| id == 49407));
        assert_eq!(t.end_position, 6);
        assert_eq!(t.truncated, 0);
    }

    #[test]
    fn bundled_vocabulary_has_clip_size() {
        let t = sd1();
        assert_eq!(t.vocab_size(), 49_408);
        assert_eq!((t.start_id(), t.end_id()), (49406, 49407));
        assert_eq!(ClipTokenizer::openai("!").pad_id(), 0);
    }

    #[test]
    fn identity_names_are_the_names_prompts_find() {
        for name in ["alice", "bob_2", "_x", "rex.v2", "a-b", "Z9"] {
            assert!(is_placeholder_name(name), "{name}");
            let prompt = format!("a photo of <{name}>");
            assert_eq!(placeholders(&prompt).collect::<Vec<_>>(), [name]);
        }
        for name in ["", "élise", "-bob", ".x", "two words", "a<b", "ünï"] {
            assert!(!is_placeholder_name(name), "{name}");
            let prompt = format!("a photo of <{name}>");
            assert!(!placeholders(&prompt).any(|found| found == name), "{name}");
        }
    }

    #[test]
    fn placeholders_take_one_position_and_skip_bpe() {
        let t = sd1().tokenize("a photo of <alice> and <bob_2> at the beach");
        assert_eq!(
            t.placeholders,
            vec![(4, "alice".to_string()), (6, "bob_2".to_string())]
        );
        let plain = sd1().tokenize("a photo of x and y at the beach");
        assert_eq!(t.ids.len(), CONTEXT_LENGTH);
        assert_eq!(t.end_position, plain.end_position);
        assert_eq!(t.ids[..4], plain.ids[..4]);
        assert_eq!(t.ids[7..], plain.ids[7..]);
    }

    #[test]
    fn long_prompts_are_cut_and_counted() {
        let text = "cat ".repeat(80);
        let t = sd1().tokenize(&text);
        assert_eq!(t.truncated, 5);
        assert_eq!(t.end_position, 76);
        assert_eq!(t.ids[76], 49407);
    }

    #[test]
    fn decode_inverts_encode() {
        let tok = sd1();
        let t = tok.tokenize("A Photo of the Eiffel tower, at night!");
        assert_eq!(
            tok.decode(&t.ids[..=t.end_position]),
            "a photo of the eiffel tower , at night !"
        );
    }

    #[test]
    fn class_words_are_single_tokens() {
        let tok = sd1();
        assert_eq!(tok.single_token("person"), Some(2533));
        assert_eq!(tok.single_token("a dog"), None);
    }
}
