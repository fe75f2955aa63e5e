//! Text normalisation: mojibake repair, Unicode NFC, control and zero-width characters,
//! the Ukrainian apostrophe, and whitespace.
//!
//! Mojibake repair restores Cyrillic text that went through a wrong decoding: UTF-8 read
//! as cp1251 ("РџСЂРёРІС–С‚"), UTF-8 read as latin-1/cp1252 ("ÐŸÑ€Ð¸Ð²Ñ–Ñ‚"), cp1251 read as
//! latin-1/cp1252 ("Ïðèâ³ò"), KOI8-U read as cp1251 and cp1251 read as KOI8-U. ftfy, the
//! anchor, repairs the first two (it only fixes UTF-8 mis-decodings); the legacy 8-bit
//! ones are common in old Ukrainian web text. A repair is tried line by line, only where
//! a line looks broken, and kept only when the result decodes cleanly and scores better:
//! fewer mojibake marks and more ordinary Ukrainian/Russian words.

use crate::stats::StepStats;
use crate::steps::{Step, Verdict};
use crate::Document;
use encoding_rs::{Encoding, KOI8_U, WINDOWS_1251, WINDOWS_1252};
use serde::{Deserialize, Serialize};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NormaliseConfig {
    pub mojibake: bool,
    pub nfc: bool,
    /// Remove C0/C1 control characters (but tab and newline), zero-width characters,
    /// soft hyphens and the BOM.
    pub control: bool,
    /// Replace the apostrophe variants between two Cyrillic letters (' ʼ ` ´ ‘ ′) with
    /// this one; empty leaves them as they are.
    pub apostrophe: String,
    /// Collapse runs of spaces, turn exotic spaces into plain ones, trim lines, and keep
    /// at most one empty line between paragraphs.
    pub whitespace: bool,
}

impl Default for NormaliseConfig {
    fn default() -> Self {
        Self {
            mojibake: true,
            nfc: true,
            control: true,
            apostrophe: "’".into(),
            whitespace: true,
        }
    }
}

pub struct Normalise {
    cfg: NormaliseConfig,
    apostrophe: Option<char>,
}

impl Normalise {
    pub fn new(cfg: &NormaliseConfig) -> Self {
        Self {
            apostrophe: cfg.apostrophe.chars().next(),
            cfg: cfg.clone(),
        }
    }

    /// Normalise `text`; `None` when nothing changed. `stats` gets per-fix counters.
    pub fn normalise(&self, text: &str, stats: &mut StepStats) -> Option<String> {
        let mut cur: Option<String> = None;
        if self.cfg.mojibake {
            if let Some(fixed) = self.repair_mojibake(text, stats) {
                cur = Some(fixed);
            }
        }
        if self.cfg.nfc {
            let t = cur.as_deref().unwrap_or(text);
            if is_nfc_quick(t.chars()) != IsNormalized::Yes {
                let n: String = t.nfc().collect();
                if n != t {
                    stats.count("nfc", 1);
                    cur = Some(n);
                }
            }
        }
        if self.cfg.control || self.apostrophe.is_some() || self.cfg.whitespace {
            let t = cur.as_deref().unwrap_or(text);
            if let Some(n) = self.clean_chars(t, stats) {
                cur = Some(n);
            }
        }
        cur
    }

    /// One pass over the characters: controls, zero-width, apostrophes, whitespace.
    fn clean_chars(&self, t: &str, stats: &mut StepStats) -> Option<String> {
        let needs = t.chars().any(|c| {
            (self.cfg.control && is_removable(c))
                || (self.apostrophe.is_some() && is_apostrophe_variant(c) && Some(c) != self.apostrophe)
                || (self.cfg.whitespace && (c == '\r' || c == '\t' || is_exotic_space(c)))
        }) || (self.cfg.whitespace && needs_space_fix(t));
        if !needs {
            return None;
        }
        let chars: Vec<char> = t.chars().collect();
        let mut out = String::with_capacity(t.len());
        let mut removed = 0u64;
        let mut apos = 0u64;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            if self.cfg.control && is_removable(c) {
                removed += 1;
                continue;
            }
            if c == '\r' {
                // CRLF -> LF, lone CR -> LF.
                if chars.get(i) != Some(&'\n') {
                    out.push('\n');
                }
                continue;
            }
            if let Some(a) = self.apostrophe {
                if is_apostrophe_variant(c) && c != a {
                    let prev = out.chars().next_back();
                    let next = chars.get(i).copied();
                    if prev.is_some_and(is_cyrillic_letter) && next.is_some_and(is_cyrillic_letter) {
                        out.push(a);
                        apos += 1;
                        continue;
                    }
                }
            }
            if self.cfg.whitespace && (c == '\t' || is_exotic_space(c)) {
                out.push(' ');
                continue;
            }
            out.push(c);
        }
        stats.count("control_chars_removed", removed);
        stats.count("apostrophes", apos);
        let out = if self.cfg.whitespace { fix_spaces(&out) } else { out };
        (out != t).then_some(out)
    }

    /// Try to undo a wrong decoding: of the whole text when it is all broken the same
    /// way, else line by line.
    pub fn repair_mojibake(&self, text: &str, stats: &mut StepStats) -> Option<String> {
        let head = prefix(text, 4000);
        let (bg, pairs) = bigram_score(head);
        let marks = mojibake_marks(head);
        if marks == 0 && (pairs < 12 || bg >= 0.4) {
            return None;
        }
        if let Some((fixed, kind)) = self.repair(text) {
            stats.count(kind, 1);
            return Some(fixed);
        }
        let mut changed = false;
        let mut out = String::with_capacity(text.len());
        for (i, line) in text.split('\n').enumerate() {
            if i > 0 {
                out.push('\n');
            }
            match self.repair(line) {
                Some((fixed, kind)) => {
                    stats.count(kind, 1);
                    out.push_str(&fixed);
                    changed = true;
                }
                None => out.push_str(line),
            }
        }
        changed.then_some(out)
    }

    /// The best re-decoding of `t`, if one turns broken text into plausible Cyrillic:
    /// before, the letter pairs are mostly not ordinary Ukrainian/Russian bigrams (or the
    /// text carries mojibake marks); after, they mostly are.
    fn repair(&self, t: &str) -> Option<(String, &'static str)> {
        if t.is_ascii() {
            return None;
        }
        let (bg, pairs) = bigram_score(t);
        let marks = mojibake_marks(t);
        let broken = if pairs >= 12 { bg < 0.3 } else { marks >= 3 };
        if !broken {
            return None;
        }
        let candidates: [(&'static Encoding, &'static Encoding, &'static str); 6] = [
            (WINDOWS_1251, encoding_rs::UTF_8, "mojibake.utf8_as_cp1251"),
            (WINDOWS_1252, encoding_rs::UTF_8, "mojibake.utf8_as_latin1"),
            (WINDOWS_1252, WINDOWS_1251, "mojibake.cp1251_as_latin1"),
            (WINDOWS_1251, KOI8_U, "mojibake.koi8u_as_cp1251"),
            (KOI8_U, WINDOWS_1251, "mojibake.cp1251_as_koi8u"),
            (KOI8_U, encoding_rs::UTF_8, "mojibake.utf8_as_koi8u"),
        ];
        let mut best: Option<(f64, String, &'static str)> = None;
        for (wrong, right, kind) in candidates {
            let Some(bytes) = encode_exact(t, wrong) else { continue };
            let (fixed, _, had_errors) = right.decode(&bytes);
            if had_errors || fixed == t {
                continue;
            }
            let (fbg, fpairs) = bigram_score(&fixed);
            let fmarks = mojibake_marks(&fixed);
            let ok = fpairs >= 4.min(pairs.max(1)) && fbg >= 0.5 && fbg >= bg + 0.25 && fmarks <= marks;
            if ok && best.as_ref().is_none_or(|b| fbg > b.0) {
                best = Some((fbg, fixed.into_owned(), kind));
            }
        }
        best.map(|(_, s, k)| (s, k))
    }
}

fn prefix(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The frequent lower-case letter pairs of Ukrainian and Russian text (measured on the
/// brown-uk and RusLit corpora: about 73% of the letter pairs of ordinary text are among
/// them, 13-18% of text scrambled through KOI8-U/cp1251).
const BIGRAMS: &str = "на ст то но по ро ал ко не ов го ни ра та ли ва ен во ка ла ер пр ор ос ти ть ол ло ог за ом од ри ре ан он ат до ви от те ас ль ел ся да ит ак мо ав ле ил ки ма нн ве ві ні де об ин ет ми ам тр ме ня сь им ив ис же ем ар ди ес се их че пе ку ід аз ик ну ру вс ад ск ок ча дн му ьк ів бо ой со чи сл ля кр хо ед ту бы ий ож зн ду сп оз ег ны ув рі ці ін ше бу оч лі вн тв ул бе га ей ті чт св мі си ут па ьн як уд іл ба са ек из жи іс нь лю ши ах оп";

/// Index of a Cyrillic letter (case folded) in 0..64, or None.
fn cyr_index(c: char) -> Option<usize> {
    let u = c as u32;
    let l = match u {
        0x0410..=0x042F => u + 0x20,
        0x0400..=0x040F => u + 0x50,
        0x0490 | 0x0491 => return Some(63),
        _ => u,
    };
    match l {
        0x0430..=0x044F => Some((l - 0x0430) as usize),
        0x0450..=0x045F => Some((l - 0x0450 + 32) as usize),
        _ => None,
    }
}

fn bigram_table() -> &'static [u64; 64] {
    static TABLE: std::sync::OnceLock<[u64; 64]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u64; 64];
        for bg in BIGRAMS.split(' ') {
            let mut cs = bg.chars();
            if let (Some(a), Some(b)) = (cs.next().and_then(cyr_index), cs.next().and_then(cyr_index)) {
                t[a] |= 1 << b;
            }
        }
        t
    })
}

/// (share of adjacent Cyrillic letter pairs that are frequent bigrams, number of pairs).
fn bigram_score(t: &str) -> (f64, usize) {
    let table = bigram_table();
    let (mut hits, mut pairs) = (0usize, 0usize);
    let mut prev: Option<usize> = None;
    for c in t.chars() {
        let cur = cyr_index(c);
        if let (Some(a), Some(b)) = (prev, cur) {
            pairs += 1;
            if table[a] >> b & 1 == 1 {
                hits += 1;
            }
        }
        prev = cur;
    }
    (if pairs == 0 { 0.0 } else { hits as f64 / pairs as f64 }, pairs)
}

/// Characters that mis-decoded Cyrillic leaves behind: Latin-1 letters, C1 controls,
/// box drawing, U+FFFD, and "Р"/"С" followed by cp1251's 0x80-0xBF symbols.
fn mojibake_marks(t: &str) -> usize {
    let mut n = 0;
    let mut prev = ' ';
    for c in t.chars() {
        if ('\u{80}'..='\u{ff}').contains(&c) && c.is_alphabetic()
            || ('\u{80}'..='\u{9f}').contains(&c)
            || ('\u{2500}'..='\u{257f}').contains(&c)
            || c == '\u{fffd}'
            || (matches!(prev, 'Р' | 'С') && is_cp1251_high(c) && !matches!(c, 'і' | 'ї' | 'є' | 'ґ' | 'ё' | 'І' | 'Ї' | 'Є' | 'Ґ' | 'Ё'))
        {
            n += 1;
        }
        prev = c;
    }
    n
}

/// Encode `s` with a single-byte encoding, failing if any character has no byte. Latin-1
/// code points 0x80-0x9F (C1 controls, what a latin-1 decoder yields) map to themselves.
fn encode_exact(s: &str, enc: &'static Encoding) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut buf = [0u8; 4];
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c as u8);
            continue;
        }
        if enc == WINDOWS_1252 && ('\u{80}'..='\u{ff}').contains(&c) {
            // latin-1 decoding: the byte is the code point (cp1252 differs only in 0x80-0x9F).
            let (b, _, err) = enc.encode(c.encode_utf8(&mut buf));
            if !err && b.len() == 1 {
                out.push(b[0]);
            } else {
                out.push(c as u32 as u8);
            }
            continue;
        }
        let (b, _, err) = enc.encode(c.encode_utf8(&mut buf));
        if err || b.len() != 1 {
            return None;
        }
        out.push(b[0]);
    }
    Some(out)
}

/// cp1251's decodings of bytes 0x80-0xBF that are not ordinary letters: what follows
/// "Р"/"С" when UTF-8 Cyrillic is read as cp1251.
fn is_cp1251_high(c: char) -> bool {
    matches!(c,
        'Ђ' | 'Ѓ' | '‚' | 'ѓ' | '„' | '…' | '†' | '‡' | '€' | '‰' | 'Љ' | '‹' | 'Њ' | 'Ќ' | 'Ћ' | 'Џ'
        | 'ђ' | '‘' | '“' | '”' | '•' | '–' | '—' | '™' | 'љ' | '›' | 'њ' | 'ќ' | 'ћ' | 'џ'
        | 'Ў' | 'ў' | 'Ј' | '¤' | 'Ґ' | '¦' | '§' | 'Ё' | '©' | 'Є' | '«' | '¬' | '®' | 'Ї'
        | '°' | '±' | 'І' | 'і' | 'ґ' | 'µ' | '¶' | '·' | 'ё' | '№' | 'є' | '»' | 'ј' | 'Ѕ' | 'ѕ' | 'ї')
}

pub fn is_cyrillic_letter(c: char) -> bool {
    matches!(c, '\u{0400}'..='\u{04FF}') && c.is_alphabetic()
}

fn is_apostrophe_variant(c: char) -> bool {
    matches!(c, '\'' | '’' | 'ʼ' | '`' | '´' | '‘' | '′')
}

fn is_removable(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t' && c != '\r')
        || matches!(c, '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' | '\u{180E}')
}

fn is_exotic_space(c: char) -> bool {
    c != ' ' && c != '\n' && c != '\t' && c != '\r' && c.is_whitespace()
}

fn needs_space_fix(t: &str) -> bool {
    t.contains("  ") || t.contains(" \n") || t.contains("\n ") || t.contains("\n\n\n")
        || t.starts_with(char::is_whitespace) || t.ends_with(char::is_whitespace)
}

/// Collapse space runs, trim every line, keep at most one empty line in a row, trim the ends.
fn fix_spaces(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut empty_run = 0;
    for line in t.split('\n') {
        let mut l = String::with_capacity(line.len());
        let mut prev_space = false;
        for c in line.trim().chars() {
            if c == ' ' {
                if !prev_space {
                    l.push(' ');
                }
                prev_space = true;
            } else {
                l.push(c);
                prev_space = false;
            }
        }
        if l.is_empty() {
            empty_run += 1;
            if empty_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            empty_run = 0;
        }
        if !out.is_empty() || !l.is_empty() {
            out.push_str(&l);
            out.push('\n');
        }
    }
    while out.ends_with('\n') {
        out.pop();
    }
    out
}

impl Step for Normalise {
    fn name(&self) -> &str {
        "normalise"
    }
    fn apply(&self, doc: &mut Document, stats: &mut StepStats) -> Verdict {
        match self.normalise(&doc.text, stats) {
            Some(t) => {
                doc.text = t;
                if doc.text.is_empty() {
                    Verdict::Drop("empty_after_normalise".into())
                } else {
                    Verdict::Modified
                }
            }
            None => Verdict::Keep,
        }
    }
}

/// Mis-decode `text` the way broken software does (for tests and the benchmark).
pub fn mangle(text: &str, kind: &str) -> Option<String> {
    let (right, wrong): (&'static Encoding, &'static Encoding) = match kind {
        "utf8_as_cp1251" => (encoding_rs::UTF_8, WINDOWS_1251),
        "utf8_as_latin1" => (encoding_rs::UTF_8, WINDOWS_1252),
        "cp1251_as_latin1" => (WINDOWS_1251, WINDOWS_1252),
        "koi8u_as_cp1251" => (KOI8_U, WINDOWS_1251),
        "cp1251_as_koi8u" => (WINDOWS_1251, KOI8_U),
        _ => return None,
    };
    let bytes = if right == encoding_rs::UTF_8 {
        text.as_bytes().to_vec()
    } else {
        encode_exact(text, right)?
    };
    if wrong == WINDOWS_1252 {
        // latin-1: every byte is its own code point.
        return Some(bytes.iter().map(|&b| b as char).collect());
    }
    let (s, _, err) = wrong.decode(&bytes);
    (!err).then(|| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &str) -> String {
        let n = Normalise::new(&NormaliseConfig::default());
        let mut st = StepStats::new("normalise");
        n.normalise(t, &mut st).unwrap_or_else(|| t.to_string())
    }

    #[test]
    fn spaces_controls_apostrophes() {
        assert_eq!(norm("  Привіт,\u{00A0}\u{200B}світе!  \r\n\r\n\r\n\tоб'єкт м`ята don't "), "Привіт, світе!\n\nоб’єкт м’ята don't");
        assert_eq!(norm("e\u{301}"), "é");
    }

    #[test]
    fn mojibake_round_trips() {
        let src = "Конституція України є Основним Законом. Людина, її життя і здоров'я, честь і гідність визнаються найвищою соціальною цінністю.";
        for kind in ["utf8_as_cp1251", "utf8_as_latin1", "cp1251_as_latin1", "koi8u_as_cp1251", "cp1251_as_koi8u"] {
            let bad = mangle(src, kind).expect(kind);
            assert_ne!(bad, src, "{kind}");
            let n = Normalise::new(&NormaliseConfig { apostrophe: String::new(), ..Default::default() });
            let mut st = StepStats::new("normalise");
            let fixed = n.repair_mojibake(&bad, &mut st);
            assert_eq!(fixed.as_deref(), Some(src), "{kind}: {bad}");
        }
    }

    #[test]
    fn clean_text_untouched() {
        let n = Normalise::new(&NormaliseConfig::default());
        let mut st = StepStats::new("normalise");
        for t in ["Привіт, світе! Café crème, Müller — «лапки» № 5 § 3 ©", "Съешь же ещё этих мягких французских булок", "ЄДРПОУ 12345678; РНОКПП"] {
            assert_eq!(n.repair_mojibake(t, &mut st), None, "{t}");
        }
    }
}
