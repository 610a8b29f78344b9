//! The crate's module graph, read from the source: an arrow from one file to another for every
//! path it names (`use crate::…`, `super::…`, a child module's `name::…`), test modules left
//! out. Two rules hold: no cycle between files, and no arrow from a lower layer up to a higher
//! one (see `LAYERS`).
//!
//! `cargo test --test modules -- --nocapture` prints the graph, one file per line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first; a module's layer is the one of its first segment. A file may
/// name files of its own layer or below.
const LAYERS: &[&[&str]] = &[
    &["rgb", "config", "device"],
    &["nn", "weights", "store", "schedule"],
    &["clip", "unet", "vae", "face"],
    &["sd", "check"],
    &["pipeline", "identity"],
    &["app"],
    &["cli"],
];

fn layer(module: &str) -> usize {
    let top = module.split("::").next().unwrap();
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| panic!("`{top}` is in no layer: add it to LAYERS in tests/modules.rs"))
}

/// `src/a/b/mod.rs` -> `a::b`, `src/a/c.rs` -> `a::c`; `src/lib.rs` -> ``.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source with comments, strings and character literals blanked, so that only code is read.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c[i] == 'r'
            && matches!(next, Some('"' | '#'))
            && !ident_char(c.get(i.wrapping_sub(1)))
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{..}'), or else a lifetime.
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c[i]);
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_char(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

fn tokens(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_whitespace() {
            i += 1;
        } else if ident_char(Some(&c[i])) {
            let start = i;
            while ident_char(c.get(i)) {
                i += 1;
            }
            out.push(c[start..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            out.push(c[i].to_string());
            i += 1;
        }
    }
    out
}

/// Drops the items under `#[cfg(test)]`; returns the names of out-of-line test modules
/// (`#[cfg(test)] mod tests;`), whose files are test code too.
fn without_tests(t: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut out = Vec::new();
    let mut test_files = Vec::new();
    let mut i = 0;
    let is_cfg_test = |i: usize| {
        t.get(i..i + 7)
            .is_some_and(|w| w.join("") == "#[cfg(test)]")
    };
    while i < t.len() {
        if !is_cfg_test(i) {
            out.push(t[i].clone());
            i += 1;
            continue;
        }
        i += 7;
        // Skip one item: to its `;`, or to the end of its first brace block.
        let start = i;
        let mut depth = 0;
        while i < t.len() {
            match t[i].as_str() {
                "{" => depth += 1,
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                ";" if depth == 0 => {
                    if let Some(m) = t[start..i].iter().position(|w| w == "mod") {
                        test_files.push(t[start + m + 1].clone());
                    }
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    (out, test_files)
}

/// What a file says: its `use` trees, the paths in its code, the items it defines.
#[derive(Default)]
struct Source {
    /// Every `use` leaf: the path, the name it binds, whether it is a re-export (`pub use`).
    uses: Vec<Use>,
    /// Every `a::b::c` outside a `use`.
    paths: Vec<Vec<String>>,
    /// The names of its items (`fn`, `struct`, …), for glob re-exports.
    items: BTreeSet<String>,
    /// Every identifier outside its `use`s: a re-exported name the file also uses itself.
    idents: BTreeSet<String>,
}

struct Use {
    path: Vec<String>,
    /// The name it binds (the last segment, or its `as`); `*` for a glob.
    name: String,
    public: bool,
}

fn read(t: &[String]) -> Source {
    let mut src = Source::default();
    let mut i = 0;
    while i < t.len() {
        if t[i] == "use" {
            let public = i > 0 && (t[i - 1] == "pub" || t[i - 1] == ")");
            let mut j = i + 1;
            let mut leaves = Vec::new();
            use_tree(t, &mut j, Vec::new(), &mut leaves);
            src.uses.extend(
                leaves
                    .into_iter()
                    .map(|(path, name)| Use { path, name, public }),
            );
            i = j;
        } else if is_ident(&t[i])
            && t.get(i + 1).is_some_and(|s| s == "::")
            && (i == 0 || t[i - 1] != "::")
        {
            let mut path = vec![t[i].clone()];
            let mut j = i + 1;
            while t.get(j).is_some_and(|s| s == "::") && t.get(j + 1).is_some_and(|s| is_ident(s)) {
                path.push(t[j + 1].clone());
                j += 2;
            }
            src.idents.insert(path[0].clone());
            src.paths.push(path);
            i = j;
        } else {
            if matches!(
                t[i].as_str(),
                "fn" | "struct" | "enum" | "trait" | "type" | "const" | "static" | "union"
            ) && let Some(name) = t.get(i + 1).filter(|s| is_ident(s))
            {
                src.items.insert(name.clone());
            }
            if is_ident(&t[i]) {
                src.idents.insert(t[i].clone());
            }
            i += 1;
        }
    }
    src
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// One `use` tree from `t[*i]`, expanded to its leaves `(path, bound name)`.
fn use_tree(
    t: &[String],
    i: &mut usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, String)>,
) {
    let mut path = prefix;
    let mut name = None;
    while *i < t.len() {
        match t[*i].as_str() {
            "::" => *i += 1,
            "{" => {
                *i += 1;
                while *i < t.len() && t[*i] != "}" {
                    use_tree(t, i, path.clone(), out);
                    if t.get(*i).is_some_and(|s| s == ",") {
                        *i += 1;
                    }
                }
                *i += 1;
                if t.get(*i).is_some_and(|s| s == ";") {
                    *i += 1;
                }
                return;
            }
            "as" => {
                name = t.get(*i + 1).cloned();
                *i += 2;
            }
            "," | "}" => break,
            ";" => {
                *i += 1;
                break;
            }
            "*" => {
                name = Some("*".into());
                *i += 1;
            }
            "self" if !path.is_empty() => *i += 1,
            word => {
                path.push(word.to_string());
                *i += 1;
            }
        }
    }
    if let Some(last) = path.last() {
        let name = name.unwrap_or_else(|| last.clone());
        out.push((path, name));
    }
}

/// The crate's files and what each says.
struct Crate {
    files: BTreeMap<String, Source>,
}

impl Crate {
    fn child(&self, module: &str, name: &str) -> Option<String> {
        let child = if module.is_empty() {
            name.to_string()
        } else {
            format!("{module}::{name}")
        };
        self.files.contains_key(&child).then_some(child)
    }

    /// The file a path named in `from` lands in: where the item it names is defined, through
    /// the file's own `use`s and the re-exports of the modules on the way. `None` for paths
    /// outside the crate.
    fn resolve(&self, from: &str, path: &[String], depth: usize) -> Option<String> {
        if depth > 16 || path.is_empty() {
            return None;
        }
        let mut base: Vec<String> = if from.is_empty() {
            Vec::new()
        } else {
            from.split("::").map(String::from).collect()
        };
        let mut rest = path;
        match rest[0].as_str() {
            "crate" => {
                base.clear();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            first => {
                if self.child(from, first).is_none() {
                    // A name the file brought in with `use`, or nothing of ours.
                    let bound = self.files[from].uses.iter().find(|u| u.name == first)?;
                    let mut full = bound.path.clone();
                    full.extend_from_slice(&rest[1..]);
                    return self.resolve(from, &full, depth + 1);
                }
            }
        }
        base.extend(rest.iter().cloned());
        self.land(base, depth)
    }

    /// The file an absolute path lands in.
    fn land(&self, abs: Vec<String>, depth: usize) -> Option<String> {
        let mut k = 0;
        while k < abs.len() && self.files.contains_key(&abs[..=k].join("::")) {
            k += 1;
        }
        let module = abs[..k].join("::");
        let Some(seg) = abs.get(k) else {
            return Some(module);
        };
        let file = &self.files[&module];
        if let Some(u) = file.uses.iter().find(|u| u.public && &u.name == seg) {
            let mut full = u.path.clone();
            full.extend_from_slice(&abs[k + 1..]);
            return self.resolve(&module, &full, depth + 1);
        }
        if !file.items.contains(seg) {
            for u in file.uses.iter().filter(|u| u.public && u.name == "*") {
                let Some(glob) = self.resolve(&module, &u.path, depth + 1) else {
                    continue;
                };
                if self.files[&glob].items.contains(seg) {
                    return Some(glob);
                }
            }
        }
        Some(module)
    }

    /// The files `module` names: through its code's paths, its private `use`s of items (a
    /// `use` of a whole module only binds a name; the paths through it count), and the
    /// re-exports its own code uses.
    fn arrows(&self, module: &str) -> BTreeSet<String> {
        let file = &self.files[module];
        let uses = file
            .uses
            .iter()
            .filter(|u| !u.public || file.idents.contains(&u.name))
            .filter(|u| {
                u.name == "*"
                    || self.resolve(module, &u.path, 0).is_some_and(|m| {
                        m.rsplit("::").next() != Some(u.path.last().unwrap().as_str())
                    })
            })
            .map(|u| &u.path);
        uses.chain(&file.paths)
            .filter_map(|p| self.resolve(module, p, 0))
            .filter(|m| m != module)
            .collect()
    }
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w.as_str()]);
                    self.low.insert(v, l);
                } else if self.on_stack.contains(w.as_str()) {
                    let l = self.low[v].min(self.index[w.as_str()]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// The crate's file graph, `module -> modules it names`, without the binaries and test code.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.retain(|f| !f.starts_with(src.join("bin")));
    let mut files = BTreeMap::new();
    let mut test_modules = BTreeSet::new();
    for path in &paths {
        let module = module_of(&src, path);
        let (code, tests) =
            without_tests(tokens(&code_only(&std::fs::read_to_string(path).unwrap())));
        for t in tests {
            test_modules.insert(if module.is_empty() {
                t
            } else {
                format!("{module}::{t}")
            });
        }
        files.insert(module, read(&code));
    }
    files.retain(|m, _| !test_modules.contains(m));
    let krate = Crate { files };
    krate
        .files
        .keys()
        .map(|m| (m.clone(), krate.arrows(m)))
        .collect()
}

#[test]
fn the_module_graph_has_no_cycle_and_points_down() {
    let graph = graph();
    let root = |m: &str| {
        if m.is_empty() {
            "(lib)".to_string()
        } else {
            m.to_string()
        }
    };
    for (from, to) in &graph {
        let to: Vec<String> = to.iter().map(|m| root(m)).collect();
        println!("{} -> {}", root(from), to.join(", "));
    }
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    println!("{} files, {edges} arrows", graph.len());

    let cycles = cycles(&graph);
    for c in &cycles {
        println!("cycle: {}", c.join(" <-> "));
    }
    let mut upward = Vec::new();
    for (from, to) in &graph {
        for m in to {
            // The crate root only declares the modules.
            if from.is_empty() || m.is_empty() {
                continue;
            }
            if layer(m) > layer(from) {
                upward.push(format!("{from} -> {m}"));
            }
        }
    }
    for u in &upward {
        println!("upward: {u}");
    }
    println!("{} cycles, {} upward arrows", cycles.len(), upward.len());
    // The page's panels and `ui/mod.rs` (its `Ctx`, whose signals hold the panels' state
    // types) still name each other; this list may only shrink.
    let known: Vec<Vec<String>> = vec![
        [
            "app::ui",
            "app::ui::clip",
            "app::ui::generate",
            "app::ui::gpu",
            "app::ui::identity",
            "app::ui::identity::list",
            "app::ui::identity::photos",
            "app::ui::identity::training",
            "app::ui::model",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let new: Vec<_> = cycles.iter().filter(|c| !known.contains(c)).collect();
    assert!(new.is_empty(), "files that name each other: {new:?}");
    for k in &known {
        assert!(
            cycles.iter().any(|c| c.iter().all(|m| k.contains(m))),
            "{k:?} is no longer a cycle (or a smaller one): shrink the known list"
        );
    }
    assert!(
        upward.is_empty(),
        "arrows from a lower layer up: {upward:?}"
    );
}

/// The reader itself: paths through `use`s and re-exports land where the item is defined,
/// test code is left out, and a cycle and an upward arrow are found.
#[test]
fn the_reader_finds_paths_cycles_and_test_code() {
    let code = r##"
        use crate::a::{b::{self, C}, d as e};
        use super::*; // crate::x
        /* nested /* comment */ crate::hidden */
        fn f<'a>(s: &'a str) -> char { let _ = "crate::not_code"; let _ = r#"crate::raw"#; '\'' }
        fn g() { child::run(); Vec::<u8>::new(); b::D::new(); e::f(); }
        #[cfg(test)]
        mod tests { use crate::tested; }
        #[cfg(test)]
        mod more;
    "##;
    let (t, tests) = without_tests(tokens(&code_only(code)));
    assert_eq!(tests, ["more"]);
    let m = read(&t);
    let uses: Vec<String> = m
        .uses
        .iter()
        .map(|u| format!("{} as {}", u.path.join("::"), u.name))
        .collect();
    assert_eq!(
        uses,
        [
            "crate::a::b as b",
            "crate::a::b::C as C",
            "crate::a::d as e",
            "super as *"
        ]
    );
    let paths: Vec<String> = m.paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["child::run", "Vec", "b::D::new", "e::f"]);
    assert_eq!(m.items, ["f", "g"].map(String::from).into());

    let file = |code: &str| read(&tokens(code));
    let krate = Crate {
        files: [
            ("", file("pub mod a; pub mod m;")),
            ("a", file("mod b; mod d; pub use b::C; pub use d::*;")),
            ("a::b", file("pub struct C; pub struct D;")),
            ("a::d", file("pub fn f() {}")),
            ("m", read(&t)),
            ("m::child", file("pub fn run() {}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    };
    let to = |p: &str| {
        let p: Vec<String> = p.split("::").map(String::from).collect();
        krate.resolve("m", &p, 0)
    };
    assert_eq!(
        to("crate::a::C").as_deref(),
        Some("a::b"),
        "through a re-export"
    );
    assert_eq!(
        to("crate::a::f").as_deref(),
        Some("a::d"),
        "through a glob re-export"
    );
    assert_eq!(
        to("b::D").as_deref(),
        Some("a::b"),
        "through the file's own use"
    );
    assert_eq!(to("super::a").as_deref(), Some("a"));
    assert_eq!(to("child::run").as_deref(), Some("m::child"));
    assert_eq!(to("Vec::new"), None);
    let arrows: Vec<String> = krate.arrows("m").into_iter().collect();
    assert_eq!(
        arrows,
        ["", "a::b", "a::d", "m::child"],
        "`use super::*` names the parent, `e::f` the module `e` stands for"
    );
    assert!(krate.arrows("a").is_empty(), "re-exports are not arrows");

    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&g), [["a", "b", "c"]]);
    assert!(layer("app::ui") > layer("unet::attention"));
}
