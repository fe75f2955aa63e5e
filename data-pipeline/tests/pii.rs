//! PII redaction on real Ukrainian text: the legal seed corpus (shared/data/uk/laws/seed)
//! and BRUK (shared/data/uk/brown-uk). Checksum-valid items of every type are generated
//! with a small deterministic PRNG, planted into real sentences and must all be replaced
//! by the right placeholder (recall 100%); the unmodified real text, full of years,
//! article numbers, sums and dates, must come out (almost) untouched, and every
//! placeholder found there is printed with its context.

use hromada_data::steps::pii::{Pii, PiiConfig, PiiCounts};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

/// ../shared/data/uk (`HROMADA_SHARED` overrides ../shared).
fn shared() -> PathBuf {
    common::shared_data().join("uk")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    v.sort();
    v
}

/// Provision texts of the legal seed corpus.
fn law_paragraphs() -> Vec<String> {
    let mut out = Vec::new();
    for p in files(&shared().join("laws/seed"), "json") {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for prov in v["provisions"].as_array().into_iter().flatten() {
            if let Some(c) = prov["content"].as_str() {
                if !c.trim().is_empty() {
                    out.push(c.to_string());
                }
            }
        }
    }
    out
}

/// Paragraphs (non-empty lines) of the BRUK "good" texts.
fn brown_paragraphs() -> Vec<String> {
    let mut out = Vec::new();
    for p in files(&shared().join("brown-uk/data/good"), "txt") {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
    }
    out
}

fn pii() -> Pii {
    Pii::new(&PiiConfig::default()).unwrap_or_else(|e| panic!("{e}"))
}

const KINDS: [&str; 7] = ["EMAIL", "PHONE", "IBAN", "RNOKPP", "PASSPORT", "CARD", "IP"];

fn get(c: &PiiCounts, kind: &str) -> u64 {
    match kind {
        "EMAIL" => c.email,
        "PHONE" => c.phone,
        "IBAN" => c.iban,
        "RNOKPP" => c.rnokpp,
        "PASSPORT" => c.passport,
        "CARD" => c.card,
        "IP" => c.ip,
        _ => panic!("{kind}"),
    }
}

/// (kind, original text, context) of every placeholder in `output`, recovered by walking
/// the literal pieces between placeholders through `input`.
fn replaced_items(input: &str, output: &str) -> Vec<(String, String, String)> {
    let mut pieces: Vec<(&str, Option<&str>)> = Vec::new(); // (literal, kind after it)
    let mut rest = output;
    loop {
        let next = KINDS
            .iter()
            .filter_map(|k| rest.find(&format!("<{k}>")).map(|i| (i, *k)))
            .min();
        match next {
            Some((i, k)) => {
                pieces.push((&rest[..i], Some(k)));
                rest = &rest[i + k.len() + 2..];
            }
            None => {
                pieces.push((rest, None));
                break;
            }
        }
    }
    let mut items = Vec::new();
    let mut cur = 0;
    for (i, (lit, kind)) in pieces.iter().enumerate() {
        cur += lit.len();
        let Some(kind) = kind else { break };
        let next_lit = pieces.get(i + 1).map_or("", |p| p.0);
        let end = if next_lit.is_empty() {
            input.len()
        } else {
            input[cur..].find(next_lit).map_or(input.len(), |j| cur + j)
        };
        let item = input[cur..end].to_string();
        let lo = input[..cur].char_indices().rev().nth(40).map_or(0, |(j, _)| j);
        let hi = input[end..].char_indices().nth(40).map_or(input.len(), |(j, _)| end + j);
        let ctx = format!("{}[[{}]]{}", &input[lo..cur], item, &input[end..hi]).replace('\n', " ");
        items.push((kind.to_string(), item, ctx));
        cur = end;
    }
    items
}

/// Items in real text that are genuine personal data and correctly redacted.
const KNOWN_REAL: &[(&str, &str)] = &[
    // BRUK, A_Podolianyn_Banakh_De_stavyty_mafy_2017.txt: a real phone number.
    ("PHONE", "093-177-00-35"),
    // BRUK: "досить зателефонувати за номером (0342)591104" (Ivano-Frankivsk).
    ("PHONE", "(0342)591104"),
    // BRUK: a dictionary project's contact address.
    ("EMAIL", "grslovnyk@i.ua"),
];

#[test]
fn real_corpus_has_almost_no_placeholders() {
    let p = pii();
    let mut by_kind: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut bytes = 0usize;
    let mut paragraphs = 0usize;
    let t = Instant::now();
    for (name, paras) in [("laws", law_paragraphs()), ("brown-uk", brown_paragraphs())] {
        assert!(paras.len() > 1000, "{name}: only {} paragraphs", paras.len());
        for para in &paras {
            bytes += para.len();
            paragraphs += 1;
            let (out, counts) = p.redact(para);
            let Some(out) = out else {
                assert_eq!(counts.total(), 0);
                continue;
            };
            let items = replaced_items(para, &out);
            assert_eq!(items.len() as u64, counts.total(), "{para}");
            for (kind, item, ctx) in items {
                eprintln!("{name}: <{kind}> {ctx}");
                by_kind.entry(kind).or_default().push((item, ctx));
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "real corpus: {paragraphs} paragraphs, {:.1} MB in {secs:.2}s ({:.1} MB/s); found {:?}",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs.max(1e-9),
        by_kind.iter().map(|(k, v)| (k.as_str(), v.len())).collect::<Vec<_>>()
    );
    assert!(bytes > 10_000_000, "corpus too small: {bytes} bytes");
    // Every placeholder in the real text is one of the few genuine items (no false
    // positive of any type), and every genuine item is found.
    for kind in KINDS {
        for (item, ctx) in by_kind.get(kind).into_iter().flatten() {
            assert!(
                KNOWN_REAL.contains(&(kind, item.as_str())),
                "false positive <{kind}> in real text: {ctx}"
            );
        }
    }
    for (kind, item) in KNOWN_REAL {
        let found = by_kind.get(*kind).into_iter().flatten().filter(|(i, _)| i == item).count();
        assert_eq!(found, 1, "the real {kind} {item} was not redacted");
    }
}

#[test]
fn ordinary_numbers_are_left_alone() {
    let p = pii();
    let sentences = [
        "Цей Закон набирає чинності з 1 січня 2023 року.",
        "Конституцію прийнято 28 червня 1996 р. на п'ятій сесії Верховної Ради України.",
        "У 1991 р. Україна проголосила незалежність, а у 2014-2015 роках тривали реформи.",
        "Відповідно до статті 12 та частини 5 статті 23 цього Кодексу.",
        "Згідно з пунктом 3.1.2 та підпунктом 14.1.54 пункту 14.1 статті 14 Податкового кодексу.",
        "пункт 1.2.3.4 Положення, підпункт 2.1.1.1, розділ 4.2.1.3, глава 1.1.1.1.",
        "3.8.1.1. Кошти клієнтів зберігаються на окремому рахунку.",
        "Розмір штрафу становить 1 500 000 грн, а видатки - 12 345,67 грн.",
        "Премія у розмірі 25000 гривень виплачується щороку.",
        "Видатки державного бюджету становлять 1929856240 тис. гривень.",
        "Обсяг фінансування 1000000000 гривень та 2 000 000 000 000 грн.",
        "Загальна сума 1234567890 грн, 123456789 грн, 12345678901234 грн.",
        "Угоду укладено 01.02.2023, зареєстровано 2023-05-01, а підписано 12 травня 2020 року.",
        "Засідання розпочнеться о 10:30 та завершиться о 18:45:30.",
        "Ставка становить 12,5 відсотка, а інфляція 3.75% за рік.",
        "Коефіцієнт дорівнює 0,0125, число пі 3,14159265358979.",
        "Закон України від 28.06.1996 № 254к/96-ВР та від 05.04.2001 № 2341-III.",
        "Постанова Кабінету Міністрів України від 30.12.2015 № 1161 та наказ № 1234/5678.",
        "ДСТУ 3008-95, ДСТУ ISO 9001:2015, ДК 021:2015 та КВЕД 62.01.",
        "Населення становить 41 130 432 особи, площа 603 628 км².",
        "Телефонний код міста 044, індекс 01001, ЄДРПОУ 00015622.",
        "У 2020 році було 1234567890 запитів, з них 987654321 оброблено.",
        "Протокол № 12 від 10.10.2010, справа № 910/12345/20.",
        "Статті 1-15, 20-25, пункти 3.1-3.15 та 1.1.1-1.1.9.",
        "Версія 1.2.3.4 програми вийшла у 2021 році.",
        "Таблиця 2.3.4.5 містить дані за 2019-2023 роки.",
        "Рахунок 2600 1234 5678 9 у банку.",
        "Номер справи 757/12345/19-ц, провадження 1-кп/123/456/2020.",
    ];
    for s in sentences {
        let (out, counts) = p.redact(s);
        assert_eq!(out, None, "changed: {s}");
        assert_eq!(counts.total(), 0);
    }
}

/// Thousands of generated sentences of ordinary numbers of every kind the hard requirement
/// names (years, articles, sums, dates, times, decimals, percentages, law numbers), with
/// random values: none may change.
#[test]
fn random_ordinary_numbers_are_left_alone() {
    let p = pii();
    let mut r = Rng(7);
    let months = ["січня", "лютого", "березня", "квітня", "травня", "червня", "липня", "серпня", "вересня", "жовтня", "листопада", "грудня"];
    let romans = ["III", "IV", "VI", "VII", "VIII", "IX"];
    let mut changed = Vec::new();
    for _ in 0..5000 {
        let mut parts = Vec::new();
        for _ in 0..4 {
            let year = 1900 + r.below(130);
            let digits = 1 + r.below(15) as u32;
            let big = r.below(10u64.pow(digits));
            let spaced = {
                let s = big.to_string();
                let sep = *r.pick(&[" ", "\u{a0}", ""]);
                let head = s.len() % 3;
                let mut g: Vec<&str> = Vec::new();
                if head > 0 {
                    g.push(&s[..head]);
                }
                g.extend((head..s.len()).step_by(3).map(|i| &s[i..i + 3]));
                g.join(sep)
            };
            let part = match r.below(16) {
                0 => format!("у {year} році"),
                1 => format!("{year} р."),
                2 => format!("{year}-{} роки", year + 1 + r.below(5)),
                3 => format!("стаття {}", 1 + r.below(400)),
                4 => format!("пункт {}.{}.{}", 1 + r.below(20), 1 + r.below(20), 1 + r.below(20)),
                5 => format!("підпункт {}.{}.{}.{}", 1 + r.below(200), 1 + r.below(60), 1 + r.below(20), 1 + r.below(20)),
                6 => format!("частина {} статті {}", 1 + r.below(10), 1 + r.below(400)),
                7 => format!("{spaced} {}", r.pick(&["грн", "гривень", "тис. грн", "млн гривень", "доларів США", "євро"])),
                8 => format!("{spaced},{:02} грн", r.below(100)),
                9 => format!("{:02}.{:02}.{year}", 1 + r.below(28), 1 + r.below(12)),
                10 => format!("{year}-{:02}-{:02}", 1 + r.below(12), 1 + r.below(28)),
                11 => format!("{} {} {year} року", 1 + r.below(28), r.pick(&months)),
                12 => format!("о {:02}:{:02}", r.below(24), r.below(60)),
                13 => format!("{},{} та {}.{}", r.below(100000), r.below(1000), r.below(1000), r.below(100000)),
                14 => format!("{},{}% або {} відсотків", r.below(100), r.below(100), r.below(100)),
                _ => format!("№ {}к/{}-ВР та № {}-{}", 1 + r.below(5000), r.below(100), 1 + r.below(5000), r.pick(&romans)),
            };
            parts.push(part);
        }
        let sentence = format!("Відповідно до закону {}.", parts.join(", "));
        if let (Some(out), _) = p.redact(&sentence) {
            changed.push(format!("{sentence}\n  -> {out}"));
        }
    }
    assert!(changed.is_empty(), "{} changed:\n{}", changed.len(), changed.join("\n"));
}

// ---- generated PII ---------------------------------------------------------------------

/// splitmix64: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
    }
}

fn luhn_digit(body: &str) -> u32 {
    let mut sum = 0;
    for (i, c) in body.chars().rev().enumerate() {
        let mut v = c.to_digit(10).unwrap_or(0);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    (10 - sum % 10) % 10
}

fn group(s: &str, sizes: &[usize], sep: &str) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    for &n in sizes {
        if i >= s.len() {
            break;
        }
        let j = (i + n).min(s.len());
        out.push(&s[i..j]);
        i = j;
    }
    if i < s.len() {
        out.push(&s[i..]);
    }
    out.join(sep)
}

fn gen_email(r: &mut Rng) -> String {
    let first = *r.pick(&["ivan", "olena", "taras", "oksana", "mykola", "iryna", "Andriy", "yulia"]);
    let last = *r.pick(&["petrenko", "kovalenko", "shevchenko", "bondar", "tkachuk", "Melnyk"]);
    let local = match r.below(5) {
        0 => format!("{first}.{last}"),
        1 => format!("{first}_{last}{}", r.digits(2)),
        2 => format!("{}.{last}", &first[..1]),
        3 => format!("{first}{}", 1950 + r.below(60)),
        _ => format!("{first}+news"),
    };
    let domain = *r.pick(&[
        "ukr.net", "gmail.com", "i.ua", "meta.ua", "kmu.gov.ua", "rada.gov.ua", "knu.ua",
        "mail.lviv.ua", "пошта.укр", "Ukr.Net",
    ]);
    format!("{local}@{domain}")
}

fn gen_phone(r: &mut Rng) -> String {
    let code = *r.pick(&["50", "66", "95", "99", "67", "68", "96", "97", "98", "63", "73", "93", "44", "32", "48", "56", "57", "62"]);
    let n = r.digits(7);
    let (a, b, c) = (&n[..3], &n[3..5], &n[5..]);
    match r.below(14) {
        0 => format!("+380 {code} {a} {b} {c}"),
        1 => format!("+38 (0{code}) {a}-{b}-{c}"),
        2 => format!("+380{code}{n}"),
        3 => format!("380{code}{n}"),
        4 => format!("0{code} {a} {b} {c}"),
        5 => format!("(0{code}) {a}-{b}-{c}"),
        6 => format!("0{code}-{a}-{b}-{c}"),
        7 => format!("0{code}{n}"),
        8 => format!("+38 0{code} {a} {b} {c}"),
        9 => format!("0{code}.{a}.{b}.{c}"),
        10 => format!("+38(0{code}){n}"),
        11 => format!("+38 0{code} {n}"),
        12 => format!("+380 {code} {a} {b}{c}"),
        _ => format!("+380 ({code}) {a}-{b}-{c}"),
    }
}

fn gen_iban(r: &mut Rng) -> String {
    let bban = format!("3{}{}", r.digits(5), r.digits(19));
    let mut rem = 0u32;
    for c in format!("{bban}UA00").chars() {
        rem = match c.to_digit(10) {
            Some(d) => (rem * 10 + d) % 97,
            None => (rem * 100 + (c as u32 - 'A' as u32 + 10)) % 97,
        };
    }
    let iban = format!("UA{:02}{bban}", 98 - rem);
    match r.below(3) {
        0 => iban,
        1 => group(&iban, &[4, 4, 4, 4, 4, 4, 4], " "),
        _ => group(&iban, &[4, 4, 4, 4, 4, 4, 4], "\u{a0}"),
    }
}

fn gen_rnokpp(r: &mut Rng) -> String {
    loop {
        let body = r.digits(9);
        let d: Vec<i64> = body.bytes().map(|b| (b - b'0') as i64).collect();
        let w = [-1, 5, 7, 9, 4, 6, 10, 5, 7];
        let sum: i64 = w.iter().zip(&d).map(|(a, b)| a * b).sum();
        let n = format!("{body}{}", sum.rem_euclid(11) % 10);
        if !n.bytes().all(|b| b == n.as_bytes()[0]) {
            return n;
        }
    }
}

fn gen_booklet(r: &mut Rng) -> String {
    const L: [&str; 20] = ["А", "В", "Е", "К", "М", "Н", "С", "Т", "О", "Р", "І", "Ю", "Б", "Г", "Д", "Є", "Ж", "З", "Л", "П"];
    let series = format!("{}{}", r.pick(&L), r.pick(&L));
    let sep = *r.pick(&[" ", "", " № ", "№"]);
    format!("{series}{sep}{}", r.digits(6))
}

fn gen_id_card(r: &mut Rng) -> String {
    loop {
        let n = format!("00{}", r.digits(7));
        let n = if r.below(2) == 0 { n } else { r.digits(9) };
        if !n.bytes().all(|b| b == n.as_bytes()[0]) {
            return n;
        }
    }
}

fn gen_card(r: &mut Rng) -> String {
    let (prefix, len) = *r.pick(&[("4", 16), ("51", 16), ("53", 16), ("55", 16), ("2221", 16), ("2720", 16), ("9804", 16), ("37", 15), ("34", 15), ("4", 13), ("6", 19), ("5", 18)]);
    let body = format!("{prefix}{}", r.digits(len - 1 - prefix.len()));
    let n = format!("{body}{}", luhn_digit(&body));
    if len == 15 {
        return group(&n, &[4, 6, 5], if r.below(2) == 0 { " " } else { "-" });
    }
    match r.below(4) {
        0 => group(&n, &[4, 4, 4, 4], " "),
        1 => group(&n, &[4, 4, 4, 4], "-"),
        2 => n,
        _ => group(&n, &[4, 4, 4, 4], " "),
    }
}

fn gen_ip(r: &mut Rng) -> String {
    if r.below(3) > 0 {
        let o: Vec<String> = (0..4).map(|i| (if i == 0 { 1 + r.below(254) } else { r.below(256) }).to_string()).collect();
        return o.join(".");
    }
    let mut g: Vec<u16> = (0..8).map(|_| r.below(65536) as u16).collect();
    g[0] = 0x2001 + r.below(0x0dff) as u16;
    if r.below(2) == 0 {
        // a run of zeros so that Display compresses it with "::"
        let s = 2 + r.below(4) as usize;
        for x in &mut g[s..s + 2] {
            *x = 0;
        }
    }
    let a = std::net::Ipv6Addr::new(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
    match r.below(3) {
        0 => a.to_string(),
        1 => g.iter().map(|x| format!("{x:04x}")).collect::<Vec<_>>().join(":"),
        _ => a.to_string().to_uppercase(),
    }
}

/// Templates per kind; `{}` is the item.
fn templates(kind: &str) -> &'static [&'static str] {
    match kind {
        "EMAIL" => &[
            "Мою електронну адресу {} можна знайти на сайті.",
            "Пишіть на {}.",
            "E-mail: {}, телефон уточнюйте.",
            "Звернення надсилайте на адресу електронної пошти ({}).",
        ],
        "PHONE" => &[
            "Мій телефон: {}.",
            "Телефонуйте за номером {} у робочі дні.",
            "Довідки за тел. {}, з 9:00 до 18:00.",
            "Гаряча лінія {}; дзвінки безкоштовні.",
            "Контактний номер ({}) вказано в заяві.",
        ],
        "IBAN" => &[
            "IBAN: {}.",
            "Кошти перераховуються на рахунок {} в АТ КБ «ПриватБанк».",
            "Реквізити: р/р {}, МФО вказано в IBAN.",
        ],
        "RNOKPP" => &[
            "РНОКПП {}.",
            "ІПН: {}, дата народження 12.03.1985.",
            "реєстраційний номер облікової картки платника податків {}, зареєстрований за адресою м. Київ.",
            "Податковий номер {} зазначено в декларації.",
            "ідентифікаційний код {};",
        ],
        "BOOKLET" => &[
            "паспорт серії {} виданий Шевченківським РВ ГУ ДМС України в м. Києві 12.05.2004.",
            "Паспорт: {}.",
            "пред'явив паспорт {}, виданий 1999 року.",
        ],
        "IDCARD" => &[
            "ID-картка № {}, видана органом 8031 20.01.2020.",
            "паспорт громадянина України у формі картки {}.",
            "номер документа: {}, дійсний до 2030 року.",
            "посвідка на проживання № {}.",
        ],
        "CARD" => &[
            "номер картки {}.",
            "Переказати на картку {} до 1 травня.",
            "Оплата карткою {}, термін дії 12/27.",
            "Картка ({}) заблокована.",
        ],
        "IP" => &[
            "IP-адреса {}.",
            "Вхід виконано з адреси {} о 10:30.",
            "Сервер {} недоступний.",
            "Підключення з IP {} заблоковано.",
        ],
        _ => panic!("{kind}"),
    }
}

/// (kind as in templates, placeholder kind, item)
fn generate(n_per_kind: usize) -> Vec<(&'static str, &'static str, String)> {
    let mut r = Rng(0x5EED_2024);
    let mut out = Vec::new();
    for _ in 0..n_per_kind {
        out.push(("EMAIL", "EMAIL", gen_email(&mut r)));
        out.push(("PHONE", "PHONE", gen_phone(&mut r)));
        out.push(("IBAN", "IBAN", gen_iban(&mut r)));
        out.push(("RNOKPP", "RNOKPP", gen_rnokpp(&mut r)));
        out.push(("BOOKLET", "PASSPORT", gen_booklet(&mut r)));
        out.push(("IDCARD", "PASSPORT", gen_id_card(&mut r)));
        out.push(("CARD", "CARD", gen_card(&mut r)));
        out.push(("IP", "IP", gen_ip(&mut r)));
    }
    out
}

/// Real sentences that come through unchanged.
fn clean_sentences(p: &Pii) -> Vec<String> {
    let mut out = Vec::new();
    for para in law_paragraphs().iter().chain(brown_paragraphs().iter()) {
        for s in para.split_inclusive(". ") {
            let s = s.trim();
            if (40..400).contains(&s.chars().count()) && s.ends_with('.') && p.redact(s).0.is_none() {
                out.push(s.to_string());
            }
        }
    }
    out
}

#[test]
fn planted_items_are_all_redacted() {
    let p = pii();
    let sentences = clean_sentences(&p);
    assert!(sentences.len() > 10_000, "{} clean sentences", sentences.len());
    let items = generate(60);
    assert!(items.len() >= 300);
    let mut r = Rng(42);
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures = Vec::new();

    // One item per document, between two real sentences: the output must be exactly the
    // document with the item replaced.
    for (tkind, kind, item) in &items {
        let t = *r.pick(templates(tkind));
        let left = r.pick(&sentences);
        let right = r.pick(&sentences);
        let doc = format!("{left} {} {right}", t.replace("{}", item));
        let want = format!("{left} {} {right}", t.replace("{}", &format!("<{kind}>")));
        let (out, counts) = p.redact(&doc);
        let out = out.unwrap_or_else(|| doc.clone());
        if out != want || counts.total() != 1 || get(&counts, kind) != 1 {
            failures.push(format!("{kind} {item:?}: {counts:?}\n  got:  {out}\n  want: {want}"));
        }
        *per_kind.entry(kind).or_default() += 1;
    }
    assert!(failures.is_empty(), "{} misses:\n{}", failures.len(), failures.join("\n"));
    eprintln!("planted one per document: {per_kind:?}");

    // Many items in one long document of real sentences: every item gone, counts exact.
    let mut doc = String::new();
    let mut want = PiiCounts::default();
    for (tkind, kind, item) in &items {
        for _ in 0..1 + r.below(3) {
            doc.push_str(r.pick(&sentences).as_str());
            doc.push(if r.below(4) == 0 { '\n' } else { ' ' });
        }
        doc.push_str(&r.pick(templates(tkind)).replace("{}", item));
        doc.push(' ');
        match *kind {
            "EMAIL" => want.email += 1,
            "PHONE" => want.phone += 1,
            "IBAN" => want.iban += 1,
            "RNOKPP" => want.rnokpp += 1,
            "PASSPORT" => want.passport += 1,
            "CARD" => want.card += 1,
            _ => want.ip += 1,
        }
    }
    let t = Instant::now();
    let (out, counts) = p.redact(&doc);
    eprintln!("one document of {} bytes in {:.3}s", doc.len(), t.elapsed().as_secs_f64());
    let out = out.unwrap_or_default();
    assert_eq!(counts, want);
    for (_, kind, item) in &items {
        assert!(!out.contains(item.as_str()), "{kind} {item} left in the output");
        assert!(out.contains(&format!("<{kind}>")));
    }
}

#[test]
fn disabled_types_are_kept() {
    let cfg = PiiConfig {
        email: false,
        card: false,
        ..PiiConfig::default()
    };
    let p = Pii::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let text = "Пишіть на ivan@ukr.net, картка 4111 1111 1111 1111, тел. 050 123 45 67.";
    let (out, counts) = p.redact(text);
    assert_eq!(out.as_deref(), Some("Пишіть на ivan@ukr.net, картка 4111 1111 1111 1111, тел. <PHONE>."));
    assert_eq!(counts.total(), 1);
}
