//! PII redaction for Ukrainian text: e-mail addresses, Ukrainian phone numbers, UA IBANs,
//! RNOKPP (the individual tax number), passport numbers (the booklet "КВ 123456" and the
//! 9-digit ID card), bank card numbers and IP addresses. Each found item is replaced by a
//! typed placeholder (`<EMAIL>`, `<PHONE>`, ...).
//!
//! Precision matters as much as recall: legal and news text is full of years, article
//! numbers, sums, dates and law numbers, and none of them may turn into a placeholder. So
//! every numeric type is anchored: IBANs, RNOKPPs and cards must pass their checksums
//! (ISO 13616 mod-97, the RNOKPP weights, Luhn), a number must stand alone (no digit,
//! letter or "digit + separator" glued to either side, which is how grouped sums such as
//! "1 500 000" and dotted section numbers look), a number followed by a unit word (грн,
//! млн, %, року...) is never personal data, a 9-digit ID-card number needs a document
//! word before it, and a dotted quad is not an IP address after a section word (пункт,
//! стаття, ...) or at the start of a sentence as a heading ("3.8.1.1. Кошти ...").
//!
//! The `regex` crate has no look-around, so boundaries are checked by hand on the
//! characters around each match; a rejected match is retried one character further on, so
//! a rejected candidate never hides a valid one that starts inside it. Types are matched
//! in a fixed order (IBAN, e-mail, card, phone, RNOKPP, passport, IP) and a span already
//! taken by an earlier type is never matched again.

use crate::error::{Error, Result};
use crate::stats::StepStats;
use crate::steps::{Step, Verdict};
use crate::Document;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::net::Ipv6Addr;

/// Which PII types to redact; all on by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PiiConfig {
    pub email: bool,
    pub phone: bool,
    pub iban: bool,
    pub rnokpp: bool,
    pub passport: bool,
    pub card: bool,
    pub ip: bool,
}

impl Default for PiiConfig {
    fn default() -> Self {
        Self {
            email: true,
            phone: true,
            iban: true,
            rnokpp: true,
            passport: true,
            card: true,
            ip: true,
        }
    }
}

/// How many items of each type one text had.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PiiCounts {
    pub email: u64,
    pub phone: u64,
    pub iban: u64,
    pub rnokpp: u64,
    pub passport: u64,
    pub card: u64,
    pub ip: u64,
}

impl PiiCounts {
    pub fn total(&self) -> u64 {
        self.email + self.phone + self.iban + self.rnokpp + self.passport + self.card + self.ip
    }

    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Iban => self.iban += 1,
            Kind::Email => self.email += 1,
            Kind::Card => self.card += 1,
            Kind::Phone => self.phone += 1,
            Kind::Rnokpp => self.rnokpp += 1,
            Kind::Passport => self.passport += 1,
            Kind::Ip => self.ip += 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Iban,
    Email,
    Card,
    Phone,
    Rnokpp,
    Passport,
    Ip,
}

impl Kind {
    fn placeholder(self) -> &'static str {
        match self {
            Kind::Iban => "<IBAN>",
            Kind::Email => "<EMAIL>",
            Kind::Card => "<CARD>",
            Kind::Phone => "<PHONE>",
            Kind::Rnokpp => "<RNOKPP>",
            Kind::Passport => "<PASSPORT>",
            Kind::Ip => "<IP>",
        }
    }
}

/// A separator that joins digit groups of one number ("1 500 000", "3.1.2", "12,5").
const SEP: &str = r"[ \x{a0}.\-]";

/// Words after a number that make it a quantity, a sum or a year, never personal data.
const UNIT_WORDS: &[&str] = &[
    "грн", "гривн", "гривен", "гривень", "коп", "тис", "млн", "мільйон", "млрд", "мільярд",
    "трлн", "дол", "usd", "uah", "eur", "євро", "руб", "%", "відсот", "рок", "рік", "р.", "рр",
    "шт", "кг", "тонн", "км", "м2", "м²", "кв.", "осіб", "грам", "одиниц", "балів",
];

/// Words that make a 9-digit number an ID-card (passport) number.
const PASSPORT_WORDS: &[&str] = &[
    "паспорт", "id-карт", "id карт", "id-card", "картк", "картки", "документ", "посвідк", "№",
];

/// Words that make a 10-digit number a tax number rather than a phone number.
const TAX_WORDS: &[&str] = &[
    "рнокпп", "іпн", "інн", "податков", "ідентифікаційн", "облікової картки", "реєстраційн",
];

/// Words before a 13-14 digit number that make it a bank account, not a card.
const ACCOUNT_WORDS: &[&str] = &["рахун", "р/р", "п/р", "мфо", "єдрпоу"];

/// Words before a Luhn-valid number that make it a product code.
const CODE_WORDS: &[&str] = &["isbn", "issn", "ean", "штрих"];

/// Words after which a dotted quad is a section number, not an IP address.
const SECTION_WORDS: &[&str] = &[
    "пункт", "п.", "пп.", "розділ", "стат", "ст.", "частин", "ч.", "глав", "§", "абзац",
    "додат", "таблиц", "рис.", "позиці", "підрозділ", "параграф", "версі", "v.", "код",
];

/// Words that make a dotted quad an IP address even where it looks like a section number.
const IP_WORDS: &[&str] = &["ip", "адрес", "сервер", "хост", "host"];

/// Compiled patterns; one `Pii` is shared by all threads.
pub struct Pii {
    cfg: PiiConfig,
    iban: Regex,
    email: Regex,
    card: Regex,
    phone: Regex,
    booklet: Regex,
    ipv4: Regex,
    ipv6: Regex,
}

fn compile(name: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| Error::Other(format!("pii: the {name} pattern: {e}")))
}

impl Pii {
    pub fn new(cfg: &PiiConfig) -> Result<Self> {
        let phone_rest = format!("{SEP}?[0-9]{{3}}{SEP}?[0-9]{{2}}{SEP}?[0-9]{{2}}");
        let phone = [
            // +380 50 123 45 67, +38 (050) 123-45-67, +380501234567, 380501234567
            format!(
                r"(?:\+[ \x{{a0}}]?)?38{SEP}?(?:\(0[3-9][0-9]\)|0[3-9][0-9]|0{SEP}?\(?[3-9][0-9]\)?){phone_rest}"
            ),
            // (044) 123-45-67
            format!(r"\(0[3-9][0-9]\){phone_rest}"),
            // 050 123 45 67, 067-123-45-67, 0501234567
            format!(r"0[3-9][0-9]{phone_rest}"),
            // (0322) 97-01-23
            format!(r"\(0[3-9][0-9]{{2}}\){SEP}?[0-9]{{2}}{SEP}?[0-9]{{2}}{SEP}?[0-9]{{2}}"),
        ]
        .join("|");
        Ok(Self {
            cfg: cfg.clone(),
            iban: compile("iban", r"(?i:ua)[ \x{a0}]?[0-9]{2}(?:[ \x{a0}]?[0-9]){25}")?,
            email: compile(
                "email",
                r"[\p{L}\p{N}_%+\-][\p{L}\p{N}._%+\-]*@[\p{L}\p{N}\-]+(?:\.[\p{L}\p{N}\-]+)*\.\p{L}{2,}",
            )?,
            card: compile(
                "card",
                r"[0-9]{4}(?:[ \-]?[0-9]{4}){2,3}(?:[ \-]?[0-9]{1,3})?|[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5}",
            )?,
            phone: compile("phone", &phone)?,
            booklet: compile(
                "passport",
                r"[АБВГҐДЕЄЖЗИІЇЙКЛМНОПРСТУФХЦЧШЩЬЮЯ]{2}[ \x{a0}]?(?:№[ \x{a0}]?)?[0-9]{6}",
            )?,
            ipv4: compile("ipv4", r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")?,
            ipv6: compile(
                "ipv6",
                r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,8}(?:\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})?",
            )?,
        })
    }

    /// Returns the redacted text (None when nothing was found) and counts per type.
    pub fn redact(&self, text: &str) -> (Option<String>, PiiCounts) {
        let mut counts = PiiCounts::default();
        let spans = self.find(text);
        if spans.v.is_empty() {
            return (None, counts);
        }
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for &(s, e, kind) in &spans.v {
            out.push_str(text.get(last..s).unwrap_or(""));
            out.push_str(kind.placeholder());
            counts.add(kind);
            last = e;
        }
        out.push_str(text.get(last..).unwrap_or(""));
        (Some(out), counts)
    }

    /// All accepted spans, sorted and non-overlapping.
    fn find(&self, text: &str) -> Spans {
        let mut spans = Spans::default();
        let bytes = text.as_bytes();
        let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
        let cfg = &self.cfg;
        if cfg.iban && digits >= 27 && bytes.iter().any(|&b| b == b'U' || b == b'u') {
            scan(&self.iban, text, Kind::Iban, &mut spans, |s, e| iban_ok(text, s, e));
        }
        if cfg.email && bytes.contains(&b'@') {
            // Unbounded, so no retry inside a match (that could go quadratic).
            for m in self.email.find_iter(text) {
                if !spans.overlaps(m.start(), m.end()) {
                    spans.insert(m.start(), m.end(), Kind::Email);
                }
            }
        }
        if cfg.card && digits >= 13 {
            scan(&self.card, text, Kind::Card, &mut spans, |s, e| card_ok(text, s, e));
        }
        if cfg.phone && digits >= 10 {
            let tax = cfg.rnokpp;
            scan(&self.phone, text, Kind::Phone, &mut spans, |s, e| phone_ok(text, s, e, tax));
        }
        if (cfg.rnokpp && digits >= 10) || (cfg.passport && digits >= 9) {
            for (s, e) in digit_runs(bytes) {
                let kind = match e - s {
                    10 if cfg.rnokpp && rnokpp_ok(text, s, e) => Kind::Rnokpp,
                    9 if cfg.passport && id_card_ok(text, s, e) => Kind::Passport,
                    _ => continue,
                };
                if !spans.overlaps(s, e) {
                    spans.insert(s, e, kind);
                }
            }
        }
        if cfg.passport && digits >= 6 {
            scan(&self.booklet, text, Kind::Passport, &mut spans, |s, e| {
                booklet_ok(text, s, e)
            });
        }
        if cfg.ip {
            // IPv6 first: "::ffff:192.0.2.128" is one address.
            if bytes.iter().filter(|&&b| b == b':').count() >= 2 {
                scan(&self.ipv6, text, Kind::Ip, &mut spans, |s, e| ipv6_ok(text, s, e));
            }
            if digits >= 4 && bytes.contains(&b'.') {
                scan(&self.ipv4, text, Kind::Ip, &mut spans, |s, e| ipv4_ok(text, s, e));
            }
        }
        spans
    }
}

impl Step for Pii {
    fn name(&self) -> &str {
        "pii"
    }

    fn apply(&self, doc: &mut Document, stats: &mut StepStats) -> Verdict {
        let (text, c) = self.redact(&doc.text);
        stats.count("pii.email", c.email);
        stats.count("pii.phone", c.phone);
        stats.count("pii.iban", c.iban);
        stats.count("pii.rnokpp", c.rnokpp);
        stats.count("pii.passport", c.passport);
        stats.count("pii.card", c.card);
        stats.count("pii.ip", c.ip);
        match text {
            Some(t) => {
                doc.text = t;
                Verdict::Modified
            }
            None => Verdict::Keep,
        }
    }
}

/// Accepted spans, sorted by start and non-overlapping.
#[derive(Default)]
struct Spans {
    v: Vec<(usize, usize, Kind)>,
}

impl Spans {
    fn overlaps(&self, s: usize, e: usize) -> bool {
        // Spans are disjoint and sorted, so the last one starting before `e` has the
        // largest end of all those that do.
        let i = self.v.partition_point(|x| x.0 < e);
        i > 0 && self.v[i - 1].1 > s
    }

    fn insert(&mut self, s: usize, e: usize, kind: Kind) {
        let i = self.v.partition_point(|x| x.0 < s);
        self.v.insert(i, (s, e, kind));
    }
}

/// Every match of `re` that `ok` accepts and that no earlier span covers. A rejected match
/// is retried from its next character, so it cannot hide a valid match starting inside
/// it (the patterns are short and bounded, so this stays linear).
fn scan(re: &Regex, text: &str, kind: Kind, spans: &mut Spans, ok: impl Fn(usize, usize) -> bool) {
    let mut pos = 0;
    while pos <= text.len() {
        let Some(m) = re.find_at(text, pos) else {
            break;
        };
        let (s, e) = (m.start(), m.end());
        if e > s && !spans.overlaps(s, e) && ok(s, e) {
            spans.insert(s, e, kind);
            pos = e;
        } else {
            pos = s + text[s..].chars().next().map_or(1, char::len_utf8);
        }
    }
}

/// Maximal runs of ASCII digits, as byte ranges (always char boundaries).
fn digit_runs(bytes: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() && !bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i >= bytes.len() {
            return None;
        }
        let s = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        Some((s, i))
    })
}

// ---- neighbourhood checks -------------------------------------------------------------

fn prev_chars(text: &str, s: usize) -> (Option<char>, Option<char>) {
    let mut it = text.get(..s).unwrap_or("").chars().rev();
    (it.next(), it.next())
}

fn next_chars(text: &str, e: usize) -> (Option<char>, Option<char>) {
    let mut it = text.get(e..).unwrap_or("").chars();
    (it.next(), it.next())
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A character that joins digit groups of one number: "1 500 000", "3.1.2", "12,5",
/// "254/96", "2020-2021".
fn is_glue(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{202f}' | '\u{2009}' | '-' | '.' | ',' | '/' | '–' | '—' | '\u{2011}'
    )
}

fn digit(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_ascii_digit())
}

/// Nothing word-like touches [s, e) and no other digit group is glued to it by a single
/// separator.
fn standalone(text: &str, s: usize, e: usize) -> bool {
    let (p1, p2) = prev_chars(text, s);
    let (n1, n2) = next_chars(text, e);
    if p1.is_some_and(is_word) || n1.is_some_and(is_word) {
        return false;
    }
    if p1.is_some_and(is_glue) && digit(p2) {
        return false;
    }
    if n1.is_some_and(is_glue) && digit(n2) {
        return false;
    }
    // A currency sign before it makes it a sum.
    !matches!(p1, Some('$' | '€' | '₴' | '£' | '+'))
}

/// The word after the number (past at most two spaces) is a unit: "25000 гривень",
/// "1991 р.", "15 %".
fn followed_by_unit(text: &str, e: usize) -> bool {
    let rest = text.get(e..).unwrap_or("");
    let rest = rest.trim_start_matches([' ', '\u{a0}', '\u{202f}', '\u{2009}']);
    let head: String = rest.chars().take(12).flat_map(char::to_lowercase).collect();
    UNIT_WORDS.iter().any(|w| head.starts_with(w))
}

/// The `n` characters before byte `s`, lowercased.
fn window_before(text: &str, s: usize, n: usize) -> String {
    let before = text.get(..s).unwrap_or("");
    let start = before.char_indices().rev().take(n).last().map_or(s, |(i, _)| i);
    before.get(start..).unwrap_or("").to_lowercase()
}

fn any_word(window: &str, words: &[&str]) -> bool {
    words.iter().any(|w| window.contains(w))
}

fn digits_of(text: &str, s: usize, e: usize) -> Vec<u8> {
    text.get(s..e)
        .unwrap_or("")
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

fn all_same(d: &[u8]) -> bool {
    d.windows(2).all(|w| w[0] == w[1])
}

// ---- validators -----------------------------------------------------------------------

/// ISO 13616 mod-97 check of an IBAN written without spaces (letters in upper case).
pub fn iban_checksum_ok(iban: &str) -> bool {
    if iban.len() < 5 || !iban.is_ascii() {
        return false;
    }
    let (head, tail) = iban.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        if let Some(d) = c.to_digit(10) {
            rem = (rem * 10 + d) % 97;
        } else if c.is_ascii_uppercase() {
            rem = (rem * 100 + (c as u32 - 'A' as u32 + 10)) % 97;
        } else {
            return false;
        }
    }
    rem == 1
}

/// The RNOKPP check digit of the first nine digits.
pub fn rnokpp_check_digit(d: &[u8]) -> Option<u8> {
    const W: [i64; 9] = [-1, 5, 7, 9, 4, 6, 10, 5, 7];
    if d.len() < 9 {
        return None;
    }
    let sum: i64 = W.iter().zip(d).map(|(w, &x)| w * x as i64).sum();
    Some((sum.rem_euclid(11) % 10) as u8)
}

/// A 10-digit RNOKPP passes its checksum.
pub fn rnokpp_checksum_ok(d: &[u8]) -> bool {
    d.len() == 10 && d.iter().all(|&x| x <= 9) && rnokpp_check_digit(d) == Some(d[9])
}

/// The Luhn check (digits as values 0..=9).
pub fn luhn_ok(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut v = x as u32;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !d.is_empty() && sum.rem_euclid(10) == 0
}

fn iban_ok(text: &str, s: usize, e: usize) -> bool {
    let (p1, _) = prev_chars(text, s);
    let (n1, _) = next_chars(text, e);
    if p1.is_some_and(is_word) || n1.is_some_and(is_word) {
        return false;
    }
    let compact: String = text
        .get(s..e)
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    compact.len() == 29 && compact.starts_with("UA") && iban_checksum_ok(&compact)
}

fn card_ok(text: &str, s: usize, e: usize) -> bool {
    let d = digits_of(text, s, e);
    if !((13..=19).contains(&d.len())
        && !all_same(&d)
        && luhn_ok(&d)
        && standalone(text, s, e)
        && !followed_by_unit(text, e))
    {
        return false;
    }
    let w = window_before(text, s, 30);
    // ISBN-13/EAN codes, and old 13-14 digit bank account numbers written in one piece.
    let account = d.len() <= 14 && d.len() == e - s && any_word(&w, ACCOUNT_WORDS) && !w.contains("карт");
    !(account || any_word(&w, CODE_WORDS))
}

fn phone_ok(text: &str, s: usize, e: usize, tax_enabled: bool) -> bool {
    let span = text.get(s..e).unwrap_or("");
    if span.matches('(').count() != span.matches(')').count() {
        return false;
    }
    let (p1, p2) = prev_chars(text, s);
    let (n1, n2) = next_chars(text, e);
    if p1.is_some_and(|c| is_word(c) || c == '+') || n1.is_some_and(is_word) {
        return false;
    }
    // "12 050 123 45 67" is a longer number; "+..." and "(0..." start phones for sure.
    if span.starts_with(|c: char| c.is_ascii_digit()) && p1.is_some_and(is_glue) && digit(p2) {
        return false;
    }
    if n1.is_some_and(is_glue) && digit(n2) {
        return false;
    }
    // A bare 10-digit number after a tax-number word is an RNOKPP starting with 0.
    if tax_enabled && span.len() == 10 && span.bytes().all(|b| b.is_ascii_digit()) {
        let d = digits_of(text, s, e);
        if rnokpp_checksum_ok(&d) && any_word(&window_before(text, s, 60), TAX_WORDS) {
            return false;
        }
    }
    true
}

fn rnokpp_ok(text: &str, s: usize, e: usize) -> bool {
    let d = digits_of(text, s, e);
    d.len() == 10
        && !all_same(&d)
        && rnokpp_checksum_ok(&d)
        && standalone(text, s, e)
        && !followed_by_unit(text, e)
}

fn id_card_ok(text: &str, s: usize, e: usize) -> bool {
    let d = digits_of(text, s, e);
    d.len() == 9
        && !all_same(&d)
        && standalone(text, s, e)
        && !followed_by_unit(text, e)
        && any_word(&window_before(text, s, 60), PASSPORT_WORDS)
}

fn booklet_ok(text: &str, s: usize, e: usize) -> bool {
    let (p1, _) = prev_chars(text, s);
    let (n1, n2) = next_chars(text, e);
    let glued = n1.is_some_and(is_glue) && digit(n2);
    !(p1.is_some_and(is_word) || n1.is_some_and(is_word) || glued || followed_by_unit(text, e))
}

fn ipv4_ok(text: &str, s: usize, e: usize) -> bool {
    let span = text.get(s..e).unwrap_or("");
    let octets_ok = span.split('.').all(|o| {
        !o.is_empty() && (o == "0" || !o.starts_with('0')) && o.parse::<u16>().is_ok_and(|v| v <= 255)
    });
    if !octets_ok {
        return false;
    }
    let (p1, p2) = prev_chars(text, s);
    let (n1, n2) = next_chars(text, e);
    if p1.is_some_and(|c| is_word(c) || c == '.') || n1.is_some_and(is_word) {
        return false;
    }
    if p1.is_some_and(is_glue) && digit(p2) {
        return false;
    }
    // 1.2.3.4.5 or 1.2.3.4,5: part of a longer number.
    if matches!(n1, Some('.' | ',')) && digit(n2) {
        return false;
    }
    // "пункт 1.2.3.4", unless an IP word comes after the section word ("в п. IP 1.2.3.4").
    let w = window_before(text, s, 15);
    let last = |words: &[&str]| words.iter().filter_map(|x| w.rfind(x)).max();
    if let Some(section) = last(SECTION_WORDS) {
        if last(IP_WORDS).is_none_or(|ip| ip < section) {
            return false;
        }
    }
    // A section heading: "... позов. 3.9.2.5. Адвокат", "\n1.2.2.1. Процедура".
    let before = text.get(..s).unwrap_or("").trim_end();
    let at_sentence_start =
        before.is_empty() || before.ends_with(['.', ';', ':', '\n', ')', '!', '?', '»', '"']);
    let heading_end = match n1 {
        Some('.' | ')') => true,
        Some(c) if c.is_whitespace() => n2.is_some_and(char::is_uppercase),
        _ => false,
    };
    if at_sentence_start && heading_end && !any_word(&window_before(text, s, 30), IP_WORDS) {
        return false;
    }
    true
}

fn ipv6_ok(text: &str, s: usize, e: usize) -> bool {
    let span = text.get(s..e).unwrap_or("");
    if span.matches(':').count() < 2 || span.parse::<Ipv6Addr>().is_err() {
        return false;
    }
    // "a::b", "12::34" are not addresses worth the risk: want a real-looking group.
    let groups: Vec<&str> = span.split(':').filter(|g| !g.is_empty()).collect();
    if groups.len() < 2 || !(groups.iter().any(|g| g.len() >= 3) || groups.len() >= 4) {
        return false;
    }
    let (p1, _) = prev_chars(text, s);
    let (n1, _) = next_chars(text, e);
    !p1.is_some_and(|c| is_word(c) || c == ':' || c == '.')
        && !n1.is_some_and(|c| is_word(c) || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pii() -> Pii {
        match Pii::new(&PiiConfig::default()) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn red(text: &str) -> String {
        pii().redact(text).0.unwrap_or_else(|| text.to_string())
    }

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    /// A valid RNOKPP from nine digits.
    fn make_rnokpp(first9: &str) -> String {
        let c = rnokpp_check_digit(&digits(first9)).unwrap_or(0);
        format!("{first9}{c}")
    }

    /// A valid UA IBAN from a 25-digit BBAN.
    fn make_iban(bban: &str) -> String {
        let mut rem = 0u32;
        for c in format!("{bban}UA00").chars() {
            rem = match c.to_digit(10) {
                Some(d) => (rem * 10 + d) % 97,
                None => (rem * 100 + (c as u32 - 'A' as u32 + 10)) % 97,
            };
        }
        format!("UA{:02}{bban}", 98 - rem)
    }

    #[test]
    fn mod97() {
        assert!(iban_checksum_ok("UA213223130000026007233566001"));
        assert!(!iban_checksum_ok("UA213223130000026007233566002"));
        assert!(!iban_checksum_ok("UA223223130000026007233566001"));
        assert!(iban_checksum_ok("GB82WEST12345698765432"));
        assert!(!iban_checksum_ok("UA21"));
        let iban = make_iban("3052990000026001234567890");
        assert!(iban_checksum_ok(&iban), "{iban}");
    }

    #[test]
    fn rnokpp_checksum() {
        let n = make_rnokpp("312456789");
        assert!(rnokpp_checksum_ok(&digits(&n)), "{n}");
        // Changing any digit breaks it.
        let mut d = digits(&n);
        d[3] = (d[3] + 1) % 10;
        assert!(!rnokpp_checksum_ok(&d));
        assert!(!rnokpp_checksum_ok(&digits("123456789")));
        // By hand: 1234567890 has sum -1+10+21+36+20+36+70+40+63 = 295, 295 mod 11 = 9.
        assert!(rnokpp_checksum_ok(&digits("1234567899")));
        assert!(!rnokpp_checksum_ok(&digits("1234567890")));
        assert_eq!(make_rnokpp("123456789"), "1234567899");
    }

    #[test]
    fn luhn() {
        assert!(luhn_ok(&digits("4111111111111111")));
        assert!(luhn_ok(&digits("79927398713")));
        assert!(luhn_ok(&digits("378282246310005")));
        assert!(!luhn_ok(&digits("4111111111111112")));
        assert!(!luhn_ok(&[]));
    }

    #[test]
    fn emails() {
        assert_eq!(red("Пишіть на ivan.petrenko@ukr.net."), "Пишіть на <EMAIL>.");
        assert_eq!(red("e-mail: o_k+1@kmu.gov.ua;"), "e-mail: <EMAIL>;");
        assert_eq!(red("адреса: іван@пошта.укр"), "адреса: <EMAIL>");
        assert_eq!(red("@handle і a@b"), "@handle і a@b");
    }

    #[test]
    fn phones() {
        for p in [
            "+380 50 123 45 67",
            "+38 (050) 123-45-67",
            "+380501234567",
            "380501234567",
            "+38 050 123 45 67",
            "+380 (50) 123-45-67",
            "050 123 45 67",
            "(044) 123-45-67",
            "067-123-45-67",
            "0501234567",
            "050.123.45.67",
            "(0322) 97-01-23",
        ] {
            assert_eq!(red(&format!("Мій телефон: {p}.")), "Мій телефон: <PHONE>.", "{p}");
        }
        // Domestic numbers start with 0[3-9]; no digit may touch them.
        assert_eq!(red("код 0201234567 тут"), "код 0201234567 тут");
        assert_eq!(red("10501234567"), "10501234567");
        assert_eq!(red("05012345678"), "05012345678");
        // An RNOKPP starting with 0 after a tax word is an RNOKPP.
        let n = make_rnokpp("051234567");
        assert_eq!(red(&format!("РНОКПП {n}")), "РНОКПП <RNOKPP>");
    }

    #[test]
    fn ibans() {
        assert_eq!(red("IBAN: UA213223130000026007233566001."), "IBAN: <IBAN>.");
        assert_eq!(red("р/р UA21 3223 1300 0002 6007 2335 6600 1 в банку"), "р/р <IBAN> в банку");
        // A bad checksum stays (and is no card or phone either).
        let bad = "IBAN UA213223130000026007233566002";
        assert_eq!(red(bad), bad);
    }

    #[test]
    fn rnokpps() {
        let n = make_rnokpp("312456789");
        assert_eq!(red(&format!("РНОКПП {n}, ")), "РНОКПП <RNOKPP>, ");
        assert_eq!(red(&format!("ІПН:{n}")), "ІПН:<RNOKPP>");
        // Glued into longer numbers, or a sum: kept.
        for t in [
            format!("1{n}"),
            format!("{n}5"),
            format!("12 {n}"),
            format!("{n},50"),
            format!("{n} грн"),
            format!("{n}.5"),
        ] {
            assert_eq!(red(&t), t);
        }
        let mut d = digits(&n);
        d[9] = (d[9] + 1) % 10;
        let bad: String = d.iter().map(|x| char::from(b'0' + x)).collect();
        assert_eq!(red(&format!("РНОКПП {bad}")), format!("РНОКПП {bad}"));
    }

    #[test]
    fn passports() {
        assert_eq!(red("паспорт серії КВ 123456 виданий"), "паспорт серії <PASSPORT> виданий");
        assert_eq!(red("паспорт МЕ123456."), "паспорт <PASSPORT>.");
        assert_eq!(red("паспорт серії КВ № 123456,"), "паспорт серії <PASSPORT>,");
        assert_eq!(red("ID-картка № 001234567, видана"), "ID-картка № <PASSPORT>, видана");
        assert_eq!(red("паспорт у формі картки 123456789"), "паспорт у формі картки <PASSPORT>");
        // 9 digits without a document word: a sum, kept.
        assert_eq!(red("видатки 123456789 тис."), "видатки 123456789 тис.");
        assert_eq!(red("разом 123456789"), "разом 123456789");
        // Letters glued on the left: not a series.
        assert_eq!(red("ДСТУ123456"), "ДСТУ123456");
    }

    #[test]
    fn cards() {
        for c in ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "3782 822463 10005"] {
            assert_eq!(red(&format!("картка {c}.")), "картка <CARD>.", "{c}");
        }
        assert_eq!(red("картка 4111 1111 1111 1112"), "картка 4111 1111 1111 1112");
        assert_eq!(red("0000 0000 0000 0000"), "0000 0000 0000 0000");
        // Luhn-valid, but an ISBN or an old account number.
        assert_eq!(red("ISBN 9789660312348"), "ISBN 9789660312348");
        assert!(luhn_ok(&digits("9789660312348")));
        assert_eq!(red("р/р 26001234567897 в банку"), "р/р 26001234567897 в банку");
        assert!(luhn_ok(&digits("26001234567897")));
    }

    #[test]
    fn ips() {
        assert_eq!(red("IP-адреса 192.168.1.10, сервер"), "IP-адреса <IP>, сервер");
        assert_eq!(red("з адреси 10.0.0.1."), "з адреси <IP>.");
        assert_eq!(red("IPv6 2001:db8::8a2e:370:7334 та fe80::1"), "IPv6 <IP> та <IP>");
        assert_eq!(red("::ffff:192.0.2.128"), "<IP>");
        for t in [
            "пункт 1.2.3.4",
            "підпункту 69.41.2.1, підпункт",
            "1.2.3.4.5",
            "позов. 3.9.2.5. Адвокат",
            "1.2.2.1. Процедура",
            "01.02.03.04",
            "300.1.1.1",
            "о 10:30:45",
            "std::vector",
            "a::b",
        ] {
            assert_eq!(red(t), t);
        }
    }

    #[test]
    fn ordinary_numbers_untouched() {
        for t in [
            "У 2023 році, 1991 р., стаття 12, пункт 3.1.2, частина 5 статті 23.",
            "Сума 1 500 000 грн, 25000 гривень, 12 345,67 грн.",
            "01.02.2023, 2023-05-01, 12 травня 2020 року о 10:30.",
            "3,14 та 12.5 %, № 254к/96-ВР, 2341-III.",
        ] {
            assert_eq!(pii().redact(t), (None, PiiCounts::default()), "{t}");
        }
    }

    #[test]
    fn config_and_step() {
        let cfg = PiiConfig { phone: false, ..PiiConfig::default() };
        let p = match Pii::new(&cfg) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.redact("тел. 050 123 45 67").0, None);
        let p = pii();
        let mut doc = Document::new("1", "тел. 050 123 45 67, ivan@ukr.net");
        let mut stats = StepStats::new("pii");
        assert_eq!(p.apply(&mut doc, &mut stats), Verdict::Modified);
        assert_eq!(doc.text, "тел. <PHONE>, <EMAIL>");
        assert_eq!(stats.counters.get("pii.phone"), Some(&1));
        assert_eq!(stats.counters.get("pii.email"), Some(&1));
        assert_eq!(p.apply(&mut doc, &mut stats), Verdict::Keep);
        assert_eq!(p.name(), "pii");
    }

    #[test]
    fn random_input_never_panics() {
        let p = pii();
        let alphabet: Vec<char> = "0123456789 .-:,/()+@UAuaКВмеїé\u{a0}\n📞_xf".chars().collect();
        let mut x: u64 = 0x1234_5678;
        for _ in 0..3000 {
            let mut s = String::new();
            for _ in 0..(x % 60) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let (out, counts) = p.redact(&s);
            assert_eq!(out.is_some(), counts.total() > 0, "{s:?}");
        }
    }

    #[test]
    fn any_unicode_input() {
        let p = pii();
        for t in ["", "é", "ї1.2.3.4ї", "@", "::", "UA", "\u{1F600}0501234567\u{1F600}", "КВ"] {
            let _ = p.redact(t);
        }
        // Every char boundary prefix of a mixed string.
        let s = "Тел.: +38 (050) 123-45-67 📞, ivan@ukr.net, КВ 123456; 2001:db8::1 — ✓";
        for (i, _) in s.char_indices() {
            let _ = p.redact(&s[i..]);
            let _ = p.redact(&s[..i]);
        }
        assert_eq!(
            p.redact(s).0.as_deref(),
            Some("Тел.: <PHONE> 📞, <EMAIL>, <PASSPORT>; <IP> — ✓")
        );
    }
}
