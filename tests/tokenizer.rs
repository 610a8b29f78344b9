//! The CLIP tokenizer against transformers' `CLIPTokenizer` (tests/fixtures/tokenizer).

use sefi::clip::{ClipTokenizer, Piece, TokenizerError};

#[derive(serde::Deserialize)]
struct Case {
    family: String,
    pad_token: String,
    prompt: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[test]
fn ids_match_transformers() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/tokenizer/cases.json")).unwrap();
    assert!(fixture.cases.len() >= 30);
    let sd1 = ClipTokenizer::openai("<|endoftext|>");
    let sd2 = ClipTokenizer::openai("!");
    for case in &fixture.cases {
        let tok = if case.pad_token == "!" { &sd2 } else { &sd1 };
        let got = tok.tokenize(&case.prompt);
        assert_eq!(
            got.ids, case.ids,
            "{} prompt {:?}",
            case.family, case.prompt
        );
        assert!(got.placeholders.is_empty());
    }
}

#[test]
fn loads_a_tokenizer_folder() {
    // A vocabulary of the 512 byte tokens plus one merge, in the tokenizer/ folder format.
    let mut vocab = serde_json::Map::new();
    let bytes: Vec<String> = (b'!'..=b'~').map(|b| (b as char).to_string()).collect();
    for (i, t) in bytes
        .iter()
        .chain(
            bytes
                .iter()
                .map(|b| format!("{b}</w>"))
                .collect::<Vec<_>>()
                .iter(),
        )
        .enumerate()
    {
        vocab.insert(t.clone(), i.into());
    }
    let n = vocab.len();
    vocab.insert("hi</w>".into(), n.into());
    vocab.insert("<|startoftext|>".into(), (n + 1).into());
    vocab.insert("<|endoftext|>".into(), (n + 2).into());
    let vocab = serde_json::Value::Object(vocab).to_string();
    let tok =
        ClipTokenizer::from_files(&vocab, "#version: 0.2\nh i</w>\n", "<|endoftext|>").unwrap();
    assert_eq!(
        tok.encode("hi hi"),
        vec![Piece::Id(n as u32), Piece::Id(n as u32)]
    );
    assert_eq!(
        tok.tokenize("hi").ids[..3],
        [n as u32 + 1, n as u32, n as u32 + 2]
    );

    let err = ClipTokenizer::from_files(&vocab, "h i j\n", "<|endoftext|>").unwrap_err();
    assert_eq!(
        err,
        TokenizerError::BadMerge {
            line: 1,
            text: "h i j".into()
        }
    );
    let err = ClipTokenizer::from_files(&vocab, "", "!!").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the tokenizer vocabulary has no `!!` token"
    );
    assert!(matches!(
        ClipTokenizer::from_files("[1]", "", "!"),
        Err(TokenizerError::BadVocab(_))
    ));
}
