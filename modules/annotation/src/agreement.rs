//! Inter-annotator agreement and consolidation by vote (requirement N5).
//!
//! Pure computation over the current annotations: no database, no clock, no randomness. Every
//! output is ordered (items by id, annotators by name, labels in schema order) and every sum is
//! taken in that order, so the same rows in any order give a byte-identical serialized report;
//! dataset versions built from [`consolidate`] rely on that.
//!
//! Every statistic is an [`Agreement`]: a finite value or the reason it is undefined. A
//! coefficient that would divide by zero is undefined, never NaN or infinite.
//!
//! Statistics (nominal data; the units are items):
//! - percent agreement: mean, over items with two or more ratings, of the share of agreeing pairs
//!   of ratings;
//! - Cohen's κ for every pair of annotators, over the items both rated;
//! - Fleiss' κ. Fleiss (1971) assumes the same number of raters on every item; with n_i raters
//!   on item i (items with n_i ≥ 2 only) this uses the usual generalisation
//!   P_i = (Σ_j n_ij² − n_i) / (n_i (n_i − 1)), P̄ = unweighted mean of the P_i,
//!   p_j = Σ_i n_ij / Σ_i n_i, P_e = Σ_j p_j², κ = (P̄ − P_e) / (1 − P_e),
//!   which is exactly Fleiss' formula when every n_i is equal;
//! - Krippendorff's α, nominal, coincidence-matrix form, missing ratings allowed.
//!
//! Single-label projects get these on the nominal categories and, per label, on the one-vs-rest
//! binary "chose this label or not". Multi-label projects have no single nominal category per
//! rating: each label is a binary present/absent decision per (item, annotator), and the overall
//! figures pool those decisions ([`Basis::PooledBinary`]).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One annotator's current annotation of one item. The caller has already resolved corrections:
/// at most one row per (item, annotator). Rows breaking that are skipped, see [`SkippedRows`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Row {
    pub item: i64,
    pub annotator: String,
    /// Single-label: exactly one class. Multi-label: any subset of the classes (may be empty:
    /// "none of them applies"); repeats count once.
    pub labels: Vec<String>,
}

/// The project's label schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Schema {
    /// The classes, in display order. That order breaks ties under
    /// [`TieRule::FirstInSchemaOrder`] and orders every per-label list. A repeated name counts
    /// once, at its first position.
    pub classes: Vec<String>,
    pub multi_label: bool,
}

/// A coefficient, or why it cannot be computed on this data.
///
/// Serialized as `{"value": 0.4}` or `{"undefined": "single_category"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Agreement {
    /// Always finite.
    Value(f64),
    Undefined(UndefinedReason),
}

impl Agreement {
    pub fn value(self) -> Option<f64> {
        match self {
            Self::Value(v) => Some(v),
            Self::Undefined(_) => None,
        }
    }
}

/// Why a coefficient is undefined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UndefinedReason {
    /// No item has two or more ratings (for a pair: the two share no item), so nothing can be
    /// compared.
    NoPairableData,
    /// Every rating used one and the same category, so the agreement expected by chance is
    /// total and the chance-corrected coefficient is 0/0. Percent agreement is still 1.
    SingleCategory,
    /// The annotator rated no item whose consensus is resolved.
    NoResolvedItems,
}

/// What to do when the top vote counts are tied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TieRule {
    /// The item is [`Consensus::Unresolved`] and goes to review; nothing is guessed.
    #[default]
    Review,
    /// Single-label: pick the tied class listed first in [`Schema::classes`]. The pick is
    /// arbitrary with respect to the data; it only makes the outcome reproducible. Multi-label: a
    /// label chosen by exactly the threshold share is left out (a label needs strictly more than
    /// the threshold; there is no schema order between "present" and "absent").
    FirstInSchemaOrder,
}

/// The share of voters above which a label enters a multi-label consensus: a number in
/// `[0, 1)`, strictly exceeded. The default, one half, is a strict majority.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Threshold(f64);

/// A [`Threshold`] outside `[0, 1)` (or NaN).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("threshold must be from 0 to 1, not {0}")]
pub struct ThresholdError(pub f64);

impl Threshold {
    pub const HALF: Self = Self(0.5);

    pub fn new(share: f64) -> Result<Self, ThresholdError> {
        // `contains` is false for NaN. 1 is allowed although no share can exceed it (no label
        // is then chosen): JSON parsers may round 0.9999999999999999 up to 1.
        if (0.0..=1.0).contains(&share) {
            Ok(Self(share))
        } else {
            Err(ThresholdError(share))
        }
    }

    pub const fn get(self) -> f64 {
        self.0
    }
}

impl Default for Threshold {
    fn default() -> Self {
        Self::HALF
    }
}

impl TryFrom<f64> for Threshold {
    type Error = ThresholdError;
    fn try_from(share: f64) -> Result<Self, ThresholdError> {
        Self::new(share)
    }
}

impl From<Threshold> for f64 {
    fn from(t: Threshold) -> f64 {
        t.0
    }
}

impl utoipa::PartialSchema for Threshold {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Double)))
            .minimum(Some(0.0))
            .maximum(Some(1.0))
            .default(Some(Self::HALF.0.into()))
            .description(Some(
                "Multi-label: a label is in the consensus when strictly more than this share of \
                 the item's voters chose it.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Threshold {}

/// How votes become a consensus.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ConsolidationRule {
    /// An item with fewer voters (annotators) than this is [`Consensus::Insufficient`].
    #[serde(deserialize_with = "whole_u32")]
    #[schema(minimum = 0, maximum = 4294967295_i64)]
    pub min_votes: u32,
    pub tie_rule: TieRule,
    /// Multi-label only.
    pub multi_label_threshold: Threshold,
}

impl Default for ConsolidationRule {
    /// Two voters at least, ties to review, strict majority per label.
    fn default() -> Self {
        Self {
            min_votes: 2,
            tie_rule: TieRule::Review,
            multi_label_threshold: Threshold::HALF,
        }
    }
}

/// The outcome of the vote on one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Consensus {
    /// Resolved. Single-label: exactly one class. Multi-label: the labels over the threshold,
    /// in schema order (possibly none).
    Label {
        labels: Vec<String>,
        /// True when [`TieRule::FirstInSchemaOrder`] decided it.
        tie_broken: bool,
    },
    /// A tie under [`TieRule::Review`]: the tied classes (multi-label: the labels chosen by
    /// exactly the threshold share), in schema order.
    Unresolved { candidates: Vec<String> },
    /// Fewer voters than [`ConsolidationRule::min_votes`].
    Insufficient { votes: u32 },
}

/// The consensus on one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ItemConsensus {
    pub item: i64,
    /// Annotators who rated the item (valid rows only).
    pub votes: u32,
    pub consensus: Consensus,
}

/// What the overall figures are computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Single-label: each rating is one nominal category.
    Nominal,
    /// Multi-label: each (item, label) is a unit with a binary present/absent rating per
    /// annotator, and all labels' units are pooled. Cohen's κ per pair pools the same way.
    PooledBinary,
}

/// Agreement over the whole project.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Overall {
    pub basis: Basis,
    pub percent: Agreement,
    pub fleiss_kappa: Agreement,
    pub krippendorff_alpha: Agreement,
    /// Items with at least one valid rating.
    pub items_rated: u64,
    /// Items with two or more valid ratings: the ones the coefficients use.
    pub items_with_2plus: u64,
}

/// Agreement on one label as a binary decision (single-label: one-vs-rest).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LabelAgreement {
    pub label: String,
    /// Ratings that chose this label.
    pub chosen: u64,
    pub percent: Agreement,
    pub fleiss_kappa: Agreement,
    pub krippendorff_alpha: Agreement,
}

/// Cohen's κ for two annotators over the items both rated (`annotator_a` < `annotator_b`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PairAgreement {
    pub annotator_a: String,
    pub annotator_b: String,
    /// Items both rated.
    pub n: u64,
    /// Share of those items (multi-label: of the item × label decisions) where they agree.
    pub percent: Agreement,
    pub cohen_kappa: Agreement,
}

/// How often one annotator matches the resolved consensus. The annotator's own vote is part of
/// that consensus, so the figure leans towards agreement, most on items with few voters.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AnnotatorAgreement {
    pub annotator: String,
    /// Items the annotator rated whose consensus is resolved.
    pub n: u64,
    /// Of those, items where the annotator's labels equal the consensus exactly.
    pub agreed: u64,
    pub agreement: Agreement,
}

/// Counts of [`Consensus`] outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct ConsolidationSummary {
    pub resolved: u64,
    /// Of `resolved`, how many [`TieRule::FirstInSchemaOrder`] decided.
    pub tie_broken: u64,
    pub unresolved: u64,
    pub insufficient: u64,
}

/// Rows left out of every figure, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct SkippedRows {
    /// A label not in the schema (for instance a class removed since).
    pub unknown_label: u64,
    /// Single-label rows without exactly one label.
    pub wrong_label_count: u64,
    /// All rows of an (item, annotator) that has more than one: which is current is unknown.
    pub duplicate: u64,
}

/// The agreement report an endpoint returns.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AgreementReport {
    pub multi_label: bool,
    pub overall: Overall,
    /// In schema order.
    pub per_label: Vec<LabelAgreement>,
    /// Ordered by (annotator_a, annotator_b); only pairs sharing at least one item.
    pub pairs: Vec<PairAgreement>,
    /// Ordered by name.
    pub annotators: Vec<AnnotatorAgreement>,
    pub consolidation: ConsolidationSummary,
    pub skipped: SkippedRows,
}

/// Per-item consensus, ordered by item id.
pub fn consolidate(rows: &[Row], schema: &Schema, rule: &ConsolidationRule) -> Vec<ItemConsensus> {
    let prepared = Prepared::new(rows, schema);
    let outcomes = prepared.vote(rule);
    prepared
        .items
        .iter()
        .zip(outcomes)
        .map(|((&item, ratings), outcome)| ItemConsensus {
            item,
            votes: votes(ratings),
            consensus: outcome.named(&prepared.classes),
        })
        .collect()
}

/// Agreement statistics, consolidation summary and annotator reliability for a project.
pub fn report(rows: &[Row], schema: &Schema, rule: &ConsolidationRule) -> AgreementReport {
    let prepared = Prepared::new(rows, schema);
    let multi = schema.multi_label;
    let k = prepared.classes.len();

    let mut overall = UnitStats::new(if multi { 2 } else { k });
    let mut per_label: Vec<UnitStats> = (0..k).map(|_| UnitStats::new(2)).collect();
    let mut chosen = vec![0u64; k];
    let mut pairs: BTreeMap<(&str, &str), PairTable> = BTreeMap::new();
    let mut items_with_2plus = 0u64;

    for ratings in prepared.items.values() {
        let m = ratings.len() as u64;
        if m >= 2 {
            items_with_2plus += 1;
        }
        let mut counts = vec![0u64; k];
        for (_, labels) in ratings {
            for &c in labels {
                counts[c] += 1;
            }
        }
        for (c, &n) in counts.iter().enumerate() {
            chosen[c] += n;
            per_label[c].add(&[m - n, n]);
            if multi {
                overall.add(&[m - n, n]);
            }
        }
        if !multi {
            overall.add(&counts);
        }
        for (i, (a, la)) in ratings.iter().enumerate() {
            for (b, lb) in &ratings[i + 1..] {
                let table = pairs
                    .entry((a, b))
                    .or_insert_with(|| PairTable::new(if multi { 2 } else { k }));
                table.items += 1;
                if multi {
                    for c in 0..k {
                        table.add(usize::from(la.contains(&c)), usize::from(lb.contains(&c)));
                    }
                } else if let (Some(&x), Some(&y)) = (la.first(), lb.first()) {
                    table.add(x, y);
                }
            }
        }
    }

    let outcomes = prepared.vote(rule);
    let mut summary = ConsolidationSummary::default();
    let mut by_annotator: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (ratings, outcome) in prepared.items.values().zip(&outcomes) {
        match outcome {
            Outcome::Resolved { labels, tie_broken } => {
                summary.resolved += 1;
                summary.tie_broken += u64::from(*tie_broken);
                for (annotator, own) in ratings {
                    let e = by_annotator.entry(annotator).or_default();
                    e.0 += 1;
                    e.1 += u64::from(own == labels);
                }
            }
            Outcome::Unresolved(_) => summary.unresolved += 1,
            Outcome::Insufficient(_) => summary.insufficient += 1,
        }
        // Annotators with no resolved item are listed too, as undefined.
        for (annotator, _) in ratings {
            by_annotator.entry(annotator).or_default();
        }
    }

    let (percent, fleiss_kappa, krippendorff_alpha) = overall.finish();
    AgreementReport {
        multi_label: multi,
        overall: Overall {
            basis: if multi {
                Basis::PooledBinary
            } else {
                Basis::Nominal
            },
            percent,
            fleiss_kappa,
            krippendorff_alpha,
            items_rated: prepared.items.len() as u64,
            items_with_2plus,
        },
        per_label: prepared
            .classes
            .iter()
            .zip(per_label)
            .zip(chosen)
            .map(|((label, stats), chosen)| {
                let (percent, fleiss_kappa, krippendorff_alpha) = stats.finish();
                LabelAgreement {
                    label: (*label).to_owned(),
                    chosen,
                    percent,
                    fleiss_kappa,
                    krippendorff_alpha,
                }
            })
            .collect(),
        pairs: pairs
            .into_iter()
            .map(|((a, b), table)| PairAgreement {
                annotator_a: a.to_owned(),
                annotator_b: b.to_owned(),
                n: table.items,
                percent: table.percent(),
                cohen_kappa: table.cohen_kappa(),
            })
            .collect(),
        annotators: by_annotator
            .into_iter()
            .map(|(annotator, (n, agreed))| AnnotatorAgreement {
                annotator: annotator.to_owned(),
                n,
                agreed,
                agreement: if n == 0 {
                    Agreement::Undefined(UndefinedReason::NoResolvedItems)
                } else {
                    Agreement::Value(agreed as f64 / n as f64)
                },
            })
            .collect(),
        consolidation: summary,
        skipped: prepared.skipped,
    }
}

/// Valid ratings grouped by item, as class indices.
struct Prepared<'a> {
    /// Schema classes without repeats, in schema order; a class's index is its position here.
    classes: Vec<&'a str>,
    multi_label: bool,
    /// item → (annotator, sorted distinct class indices), ordered by annotator.
    items: BTreeMap<i64, Vec<(&'a str, Vec<usize>)>>,
    skipped: SkippedRows,
}

type Ratings<'a> = [(&'a str, Vec<usize>)];

fn votes(ratings: &Ratings<'_>) -> u32 {
    u32::try_from(ratings.len()).unwrap_or(u32::MAX)
}

impl<'a> Prepared<'a> {
    fn new(rows: &'a [Row], schema: &'a Schema) -> Self {
        let mut classes = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for class in &schema.classes {
            if !index.contains_key(class.as_str()) {
                index.insert(class, classes.len());
                classes.push(class.as_str());
            }
        }

        // Sort first, so duplicates are adjacent and found whatever the input order. Equal keys
        // are all dropped below, so their relative order does not matter.
        let mut sorted: Vec<&Row> = rows.iter().collect();
        sorted.sort_unstable_by(|x, y| (x.item, &x.annotator).cmp(&(y.item, &y.annotator)));

        let mut items: BTreeMap<i64, Vec<(&str, Vec<usize>)>> = BTreeMap::new();
        let mut skipped = SkippedRows::default();
        for group in sorted.chunk_by(|x, y| x.item == y.item && x.annotator == y.annotator) {
            let [row] = group else {
                skipped.duplicate += group.len() as u64;
                continue;
            };
            let Some(mut labels) = row
                .labels
                .iter()
                .map(|l| index.get(l.as_str()).copied())
                .collect::<Option<Vec<usize>>>()
            else {
                skipped.unknown_label += 1;
                continue;
            };
            labels.sort_unstable();
            labels.dedup();
            if !schema.multi_label && labels.len() != 1 {
                skipped.wrong_label_count += 1;
                continue;
            }
            // Rows come in (item, annotator) order, so each Vec is ordered by annotator.
            items
                .entry(row.item)
                .or_default()
                .push((row.annotator.as_str(), labels));
        }
        Self {
            classes,
            multi_label: schema.multi_label,
            items,
            skipped,
        }
    }

    /// One outcome per item, in item order.
    fn vote(&self, rule: &ConsolidationRule) -> Vec<Outcome> {
        let k = self.classes.len();
        self.items
            .values()
            .map(|ratings| {
                let voters = votes(ratings);
                if voters < rule.min_votes {
                    return Outcome::Insufficient(voters);
                }
                let mut counts = vec![0u32; k];
                for (_, labels) in ratings {
                    for &c in labels {
                        counts[c] += 1;
                    }
                }
                if self.multi_label {
                    vote_multi(&counts, voters, rule)
                } else {
                    vote_single(&counts, rule.tie_rule)
                }
            })
            .collect()
    }
}

/// A consensus on class indices, before names are attached.
enum Outcome {
    Resolved {
        labels: Vec<usize>,
        tie_broken: bool,
    },
    Unresolved(Vec<usize>),
    Insufficient(u32),
}

impl Outcome {
    fn named(self, classes: &[&str]) -> Consensus {
        let names = |ix: Vec<usize>| ix.into_iter().map(|c| classes[c].to_owned()).collect();
        match self {
            Self::Resolved { labels, tie_broken } => Consensus::Label {
                labels: names(labels),
                tie_broken,
            },
            Self::Unresolved(candidates) => Consensus::Unresolved {
                candidates: names(candidates),
            },
            Self::Insufficient(votes) => Consensus::Insufficient { votes },
        }
    }
}

fn vote_single(counts: &[u32], tie_rule: TieRule) -> Outcome {
    let top = counts.iter().copied().max().unwrap_or(0);
    // In index order, which is schema order.
    let tied: Vec<usize> = (0..counts.len()).filter(|&c| counts[c] == top).collect();
    match (tied.as_slice(), tie_rule) {
        ([only], _) => Outcome::Resolved {
            labels: vec![*only],
            tie_broken: false,
        },
        (_, TieRule::Review) => Outcome::Unresolved(tied),
        (_, TieRule::FirstInSchemaOrder) => Outcome::Resolved {
            labels: tied.into_iter().take(1).collect(),
            tie_broken: true,
        },
    }
}

fn vote_multi(counts: &[u32], voters: u32, rule: &ConsolidationRule) -> Outcome {
    let t = rule.multi_label_threshold.get();
    let mut labels = Vec::new();
    let mut tied = Vec::new();
    for (c, &n) in counts.iter().enumerate() {
        // Division is correctly rounded, so a share equal to the threshold as the user wrote it
        // (2 of 4 vs 0.5, 3 of 5 vs 0.6) compares equal.
        let share = f64::from(n) / f64::from(voters);
        if share > t {
            labels.push(c);
        } else if share == t {
            tied.push(c);
        }
    }
    match rule.tie_rule {
        TieRule::Review if !tied.is_empty() => Outcome::Unresolved(tied),
        _ => Outcome::Resolved {
            labels,
            tie_broken: !tied.is_empty(),
        },
    }
}

/// Sums for percent agreement, Fleiss' κ and Krippendorff's α over units (items), each given as
/// its count of ratings per category.
struct UnitStats {
    /// Units with two or more ratings.
    units: u64,
    /// Σ over those units of P_i, the share of agreeing rating pairs.
    agreement: f64,
    /// Ratings per category over those units (Fleiss' p_j numerators; α's n_c).
    totals: Vec<u64>,
    /// Σ_u (m_u² − Σ_c n_uc²) / (m_u − 1): the off-diagonal mass of α's coincidence matrix,
    /// without building the matrix.
    disagreement: f64,
}

impl UnitStats {
    fn new(categories: usize) -> Self {
        Self {
            units: 0,
            agreement: 0.0,
            totals: vec![0; categories],
            disagreement: 0.0,
        }
    }

    fn add(&mut self, counts: &[u64]) {
        let m: u64 = counts.iter().sum();
        // A unit with fewer than two ratings has no pair: α drops it, the others skip it.
        if m < 2 {
            return;
        }
        let squares: u64 = counts.iter().map(|n| n * n).sum();
        self.units += 1;
        self.agreement += (squares - m) as f64 / (m * (m - 1)) as f64;
        self.disagreement += (m * m - squares) as f64 / (m - 1) as f64;
        for (total, n) in self.totals.iter_mut().zip(counts) {
            *total += n;
        }
    }

    /// (percent, Fleiss' κ, Krippendorff's α).
    fn finish(&self) -> (Agreement, Agreement, Agreement) {
        if self.units == 0 {
            let none = Agreement::Undefined(UndefinedReason::NoPairableData);
            return (none, none, none);
        }
        let percent = self.agreement / self.units as f64;
        let n: u128 = self.totals.iter().map(|&t| u128::from(t)).sum();
        let squares: u128 = self.totals.iter().map(|&t| u128::from(t).pow(2)).sum();
        // Checked on integers: all ratings in one category ⇔ Σ n_c² = n².
        if squares == n * n {
            let one = Agreement::Undefined(UndefinedReason::SingleCategory);
            return (Agreement::Value(percent), one, one);
        }
        // Σ_{c≠k} n_c n_k, exact.
        let cross = (n * n - squares) as f64;
        let n = n as f64;
        let expected = 1.0 - cross / (n * n);
        let fleiss = (percent - expected) / (1.0 - expected);
        // α = 1 − D_o/D_e = 1 − (n − 1) Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k.
        let alpha = 1.0 - (n - 1.0) * self.disagreement / cross;
        (
            Agreement::Value(percent),
            Agreement::Value(fleiss),
            Agreement::Value(alpha),
        )
    }
}

/// A two-annotator contingency table (rows: annotator a, columns: b).
struct PairTable {
    k: usize,
    cells: Vec<u64>,
    items: u64,
}

impl PairTable {
    fn new(k: usize) -> Self {
        Self {
            k,
            cells: vec![0; k * k],
            items: 0,
        }
    }

    fn add(&mut self, a: usize, b: usize) {
        self.cells[a * self.k + b] += 1;
    }

    fn total(&self) -> u64 {
        self.cells.iter().sum()
    }

    fn diagonal(&self) -> u64 {
        (0..self.k).map(|c| self.cells[c * self.k + c]).sum()
    }

    fn percent(&self) -> Agreement {
        match self.total() {
            0 => Agreement::Undefined(UndefinedReason::NoPairableData),
            t => Agreement::Value(self.diagonal() as f64 / t as f64),
        }
    }

    fn cohen_kappa(&self) -> Agreement {
        let t = u128::from(self.total());
        if t == 0 {
            return Agreement::Undefined(UndefinedReason::NoPairableData);
        }
        // κ = (p_o − p_e)/(1 − p_e) = (T·diag − S)/(T² − S), S = Σ_c row_c·col_c, all integers.
        let s: u128 = (0..self.k)
            .map(|c| {
                let row: u64 = self.cells[c * self.k..(c + 1) * self.k].iter().sum();
                let col: u64 = (0..self.k).map(|r| self.cells[r * self.k + c]).sum();
                u128::from(row) * u128::from(col)
            })
            .sum();
        if s == t * t {
            return Agreement::Undefined(UndefinedReason::SingleCategory);
        }
        // Subtract on integers (exact), divide once. T·diag and S are at most T², so both fit
        // i128; the numerator is negative when agreement is below chance.
        let diag = u128::from(self.diagonal());
        let num = (t * diag) as i128 - s as i128;
        let den = t * t - s;
        Agreement::Value(num as f64 / den as f64)
    }
}

/// A `u32` as JSON Schema's `integer` admits it: `3`, and also `3.0` (no fractional part).
fn whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    use serde::de::Error as _;
    let n = serde_json::Number::deserialize(d)?;
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Some(u),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
            Some(f as u64)
        }
        _ => None,
    };
    whole.and_then(|u| u32::try_from(u).ok()).ok_or_else(|| {
        D::Error::custom(format!(
            "must be a whole number from 0 to {}, not {n}",
            u32::MAX
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-6;

    fn row(item: i64, annotator: &str, labels: &[&str]) -> Row {
        Row {
            item,
            annotator: annotator.to_owned(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        }
    }

    fn single(classes: &[&str]) -> Schema {
        Schema {
            classes: classes.iter().map(|c| (*c).to_owned()).collect(),
            multi_label: false,
        }
    }

    fn multi(classes: &[&str]) -> Schema {
        Schema {
            multi_label: true,
            ..single(classes)
        }
    }

    fn rule(min_votes: u32, tie_rule: TieRule) -> ConsolidationRule {
        ConsolidationRule {
            min_votes,
            tie_rule,
            multi_label_threshold: Threshold::HALF,
        }
    }

    #[track_caller]
    fn close(got: Agreement, want: f64) {
        let v = got.value().unwrap_or_else(|| panic!("undefined: {got:?}"));
        assert!((v - want).abs() < TOL, "got {v}, want {want}");
    }

    /// Reliability data as a coder × unit matrix, `None` = missing; classes "1".."9".
    fn matrix(coders: &[(&str, &[Option<u8>])]) -> Vec<Row> {
        let mut rows = Vec::new();
        for (coder, values) in coders {
            for (unit, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    rows.push(row(unit as i64 + 1, coder, &[&v.to_string()]));
                }
            }
        }
        rows
    }

    // N5: Cohen's κ on the 2×2 example (20 yes/yes, 5 A-yes/B-no, 10 A-no/B-yes, 15 no/no):
    // p_o = 0.7, p_e = 0.5·0.6 + 0.5·0.4 = 0.5, κ = 0.4. The Wikipedia article "Cohen's kappa",
    // simple example (grant proposals, readers A and B); table confirmed against the copy at
    // http://howcodex.com/statistics/cohen_kappa_coefficient.htm.
    #[test]
    fn cohen_two_by_two() {
        let mut rows = Vec::new();
        let cells = [
            (20, "yes", "yes"),
            (5, "yes", "no"),
            (10, "no", "yes"),
            (15, "no", "no"),
        ];
        let mut item = 0;
        for (count, a, b) in cells {
            for _ in 0..count {
                item += 1;
                rows.push(row(item, "A", &[a]));
                rows.push(row(item, "B", &[b]));
            }
        }
        let r = report(
            &rows,
            &single(&["yes", "no"]),
            &ConsolidationRule::default(),
        );
        assert_eq!(r.pairs.len(), 1);
        let p = &r.pairs[0];
        assert_eq!(
            (p.annotator_a.as_str(), p.annotator_b.as_str(), p.n),
            ("A", "B", 50)
        );
        close(p.cohen_kappa, 0.40);
        close(p.percent, 0.70);
        close(r.overall.percent, 0.70);
    }

    // N5: Fleiss' κ, worked example of the Wikipedia article "Fleiss' kappa": 10 subjects,
    // 14 raters each, 5 categories; cells are the number of raters putting subject i in
    // category j. Published: p_j = 0.143, 0.200, 0.279, 0.150, 0.229; P̄ = 0.378;
    // P_e = 0.213; κ = 0.210 (0.2099307 unrounded).
    #[test]
    fn fleiss_wikipedia() {
        let table: [[usize; 5]; 10] = [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ];
        let classes = ["1", "2", "3", "4", "5"];
        let mut rows = Vec::new();
        for (i, counts) in table.iter().enumerate() {
            assert_eq!(counts.iter().sum::<usize>(), 14);
            let mut rater = 0;
            for (j, &n) in counts.iter().enumerate() {
                for _ in 0..n {
                    rows.push(row(i as i64, &format!("r{rater:02}"), &[classes[j]]));
                    rater += 1;
                }
            }
        }
        let r = report(&rows, &single(&classes), &ConsolidationRule::default());
        assert_eq!(
            (r.overall.items_rated, r.overall.items_with_2plus),
            (10, 10)
        );
        let p: Vec<f64> = r
            .per_label
            .iter()
            .map(|l| l.chosen as f64 / 140.0)
            .collect();
        for (got, want) in p.iter().zip([0.143, 0.200, 0.279, 0.150, 0.229]) {
            assert!((got - want).abs() < 5e-4, "p_j {got} vs {want}");
        }
        close(r.overall.percent, 0.378_022_0);
        close(r.overall.fleiss_kappa, 0.209_930_7);
    }

    // N5: Krippendorff's α, nominal, with missing values: the computational example of the
    // Wikipedia article "Krippendorff's alpha" (3 coders, 15 units; units 1, 2 and 14 have
    // fewer than two values and drop out). Published α = 0.691. By hand: n = 26 pairable values
    // (n_1..n_4 = 7, 4, 10, 5), off-diagonal coincidences Σ o_ck = 6, Σ_{c≠k} n_c n_k = 486,
    // α = 1 − 25·6/486 = 56/81 = 0.691358.
    #[test]
    fn krippendorff_wikipedia() {
        let (x, s) = (None, Some);
        let rows = matrix(&[
            (
                "A",
                &[
                    x,
                    x,
                    x,
                    x,
                    x,
                    s(3),
                    s(4),
                    s(1),
                    s(2),
                    s(1),
                    s(1),
                    s(3),
                    s(3),
                    x,
                    s(3),
                ],
            ),
            (
                "B",
                &[
                    s(1),
                    x,
                    s(2),
                    s(1),
                    s(3),
                    s(3),
                    s(4),
                    s(3),
                    x,
                    x,
                    x,
                    x,
                    x,
                    x,
                    x,
                ],
            ),
            (
                "C",
                &[
                    x,
                    x,
                    s(2),
                    s(1),
                    s(3),
                    s(4),
                    s(4),
                    x,
                    s(2),
                    s(1),
                    s(1),
                    s(3),
                    s(3),
                    x,
                    s(4),
                ],
            ),
        ]);
        let r = report(
            &rows,
            &single(&["1", "2", "3", "4"]),
            &ConsolidationRule::default(),
        );
        assert_eq!(
            (r.overall.items_rated, r.overall.items_with_2plus),
            (13, 12)
        );
        close(r.overall.krippendorff_alpha, 0.691_358);
    }

    // N5: perfect agreement with two categories in use gives 1 everywhere.
    #[test]
    fn perfect_agreement_is_one() {
        let mut rows = Vec::new();
        for item in 0..6 {
            let label = if item % 2 == 0 { "cat" } else { "dog" };
            for a in ["a", "b", "c"] {
                rows.push(row(item, a, &[label]));
            }
        }
        let r = report(
            &rows,
            &single(&["cat", "dog"]),
            &ConsolidationRule::default(),
        );
        close(r.overall.percent, 1.0);
        close(r.overall.fleiss_kappa, 1.0);
        close(r.overall.krippendorff_alpha, 1.0);
        assert_eq!(r.pairs.len(), 3);
        for p in &r.pairs {
            close(p.cohen_kappa, 1.0);
        }
        for l in &r.per_label {
            close(l.fleiss_kappa, 1.0);
            close(l.krippendorff_alpha, 1.0);
        }
    }

    // N5: a one-value domain (everyone always "cat") has zero expected disagreement:
    // chance-corrected coefficients are undefined, not NaN; percent agreement is 1.
    #[test]
    fn one_value_domain_is_undefined() {
        let mut rows = Vec::new();
        for item in 0..4 {
            for a in ["a", "b"] {
                rows.push(row(item, a, &["cat"]));
            }
        }
        let r = report(
            &rows,
            &single(&["cat", "dog"]),
            &ConsolidationRule::default(),
        );
        let one = Agreement::Undefined(UndefinedReason::SingleCategory);
        close(r.overall.percent, 1.0);
        assert_eq!(r.overall.fleiss_kappa, one);
        assert_eq!(r.overall.krippendorff_alpha, one);
        assert_eq!(r.pairs[0].cohen_kappa, one);
        // "dog" one-vs-rest: everyone always "not dog".
        assert_eq!(r.per_label[1].krippendorff_alpha, one);
        let json = serde_json::to_value(&r).expect("serialize");
        assert_eq!(
            json["overall"]["fleiss_kappa"],
            serde_json::json!({"undefined": "single_category"})
        );
        assert_eq!(
            json["overall"]["percent"],
            serde_json::json!({"value": 1.0})
        );
    }

    // N5: with no item rated twice nothing is pairable.
    #[test]
    fn no_pairable_data_is_undefined() {
        let rows = vec![row(1, "a", &["cat"]), row(2, "b", &["dog"])];
        let r = report(
            &rows,
            &single(&["cat", "dog"]),
            &ConsolidationRule::default(),
        );
        let none = Agreement::Undefined(UndefinedReason::NoPairableData);
        assert_eq!(
            (
                r.overall.percent,
                r.overall.fleiss_kappa,
                r.overall.krippendorff_alpha
            ),
            (none, none, none)
        );
        assert_eq!((r.overall.items_rated, r.overall.items_with_2plus), (2, 0));
        assert!(r.pairs.is_empty());
        assert_eq!(r.consolidation.insufficient, 2);
    }

    // N5: a 1–1 tie goes to review under `Review` and to the class listed first under
    // `FirstInSchemaOrder` (schema order, not alphabetical or input order).
    #[test]
    fn ties_under_each_rule() {
        let rows = vec![
            row(1, "a", &["cat"]),
            row(1, "b", &["dog"]),
            row(2, "a", &["cat"]),
            row(2, "b", &["cat"]),
            row(2, "c", &["dog"]),
        ];
        let schema = single(&["dog", "cat"]);
        let review = consolidate(&rows, &schema, &rule(2, TieRule::Review));
        assert_eq!(
            review[0].consensus,
            Consensus::Unresolved {
                candidates: vec!["dog".into(), "cat".into()]
            }
        );
        let majority = Consensus::Label {
            labels: vec!["cat".into()],
            tie_broken: false,
        };
        assert_eq!(review[1].consensus, majority);

        let first = consolidate(&rows, &schema, &rule(2, TieRule::FirstInSchemaOrder));
        assert_eq!(
            first[0].consensus,
            Consensus::Label {
                labels: vec!["dog".into()],
                tie_broken: true
            }
        );
        assert_eq!(first[1].consensus, majority);

        let r = report(&rows, &schema, &rule(2, TieRule::FirstInSchemaOrder));
        assert_eq!(
            r.consolidation,
            ConsolidationSummary {
                resolved: 2,
                tie_broken: 1,
                unresolved: 0,
                insufficient: 0
            }
        );
        let r = report(&rows, &schema, &rule(2, TieRule::Review));
        assert_eq!(
            (r.consolidation.resolved, r.consolidation.unresolved),
            (1, 1)
        );
    }

    // N5: items with fewer voters than min_votes are insufficient, with their vote count.
    #[test]
    fn min_votes() {
        let rows = vec![
            row(1, "a", &["cat"]),
            row(2, "a", &["cat"]),
            row(2, "b", &["cat"]),
            row(3, "a", &["dog"]),
            row(3, "b", &["dog"]),
            row(3, "c", &["cat"]),
        ];
        let schema = single(&["cat", "dog"]);
        let out = consolidate(&rows, &schema, &rule(3, TieRule::Review));
        let got: Vec<(i64, u32, &Consensus)> = out
            .iter()
            .map(|c| (c.item, c.votes, &c.consensus))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, &Consensus::Insufficient { votes: 1 }),
                (2, 2, &Consensus::Insufficient { votes: 2 }),
                (
                    3,
                    3,
                    &Consensus::Label {
                        labels: vec!["dog".into()],
                        tie_broken: false
                    }
                ),
            ]
        );
        let json = serde_json::to_value(&out[0]).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"item": 1, "votes": 1, "consensus": {"status": "insufficient", "votes": 1}})
        );
        // min_votes 1: a single vote is its own consensus.
        let out = consolidate(&rows, &schema, &rule(1, TieRule::Review));
        assert_eq!(
            out[0].consensus,
            Consensus::Label {
                labels: vec!["cat".into()],
                tie_broken: false
            }
        );
    }

    // N5: agreement with the consensus finds the unreliable annotator; an annotator with no
    // resolved item is listed as undefined.
    #[test]
    fn annotator_vs_consensus() {
        let mut rows = Vec::new();
        for (item, ab, c) in [
            (1, "pos", "neg"),
            (2, "neg", "neg"),
            (3, "pos", "neg"),
            (4, "neg", "pos"),
        ] {
            rows.push(row(item, "a", &[ab]));
            rows.push(row(item, "b", &[ab]));
            rows.push(row(item, "c", &[c]));
        }
        rows.push(row(5, "c", &["pos"]));
        rows.push(row(6, "d", &["pos"]));
        let r = report(&rows, &single(&["pos", "neg"]), &rule(2, TieRule::Review));
        let got: Vec<(&str, u64, u64, Option<f64>)> = r
            .annotators
            .iter()
            .map(|a| (a.annotator.as_str(), a.n, a.agreed, a.agreement.value()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 4, 4, Some(1.0)),
                ("b", 4, 4, Some(1.0)),
                ("c", 4, 1, Some(0.25)),
                ("d", 0, 0, None),
            ]
        );
        assert_eq!(
            r.annotators[3].agreement,
            Agreement::Undefined(UndefinedReason::NoResolvedItems)
        );
    }

    // N5: multi-label agreement per label (binary present/absent), pooled overall figures,
    // pooled Cohen per pair and threshold consensus. Values derived by hand:
    // item 1: a {cat}, b {cat, dog}, c {cat}; item 2: a {}, b {dog}, c {dog}.
    // cat: every unit unanimous → percent 1, κ 1, α 1.
    // dog: units [2 absent, 1 present], [1, 2] → P_i = 1/3, P_e = 1/2, κ = −1/3;
    //      α: n = 6, Σ o_off = 4, Σ n_c n_k = 18 → α = 1 − 5·4/18 = −1/9.
    // pooled: 4 units → percent 2/3, κ 1/3, α = 1 − 11·4/72 = 7/18.
    // pair a–b over 4 decisions: cells (0,0)=1, (0,1)=2, (1,1)=1 → κ = (4·2 − 6)/(16 − 6) = 0.2.
    #[test]
    fn multi_label_per_label() {
        let rows = vec![
            row(1, "a", &["cat"]),
            row(1, "b", &["dog", "cat", "dog"]),
            row(1, "c", &["cat"]),
            row(2, "a", &[]),
            row(2, "b", &["dog"]),
            row(2, "c", &["dog"]),
        ];
        let schema = multi(&["cat", "dog"]);
        let r = report(&rows, &schema, &rule(2, TieRule::Review));
        assert_eq!(r.overall.basis, Basis::PooledBinary);
        let cat = &r.per_label[0];
        assert_eq!((cat.label.as_str(), cat.chosen), ("cat", 3));
        close(cat.percent, 1.0);
        close(cat.fleiss_kappa, 1.0);
        close(cat.krippendorff_alpha, 1.0);
        let dog = &r.per_label[1];
        assert_eq!((dog.label.as_str(), dog.chosen), ("dog", 3));
        close(dog.percent, 1.0 / 3.0);
        close(dog.fleiss_kappa, -1.0 / 3.0);
        close(dog.krippendorff_alpha, -1.0 / 9.0);
        close(r.overall.percent, 2.0 / 3.0);
        close(r.overall.fleiss_kappa, 1.0 / 3.0);
        close(r.overall.krippendorff_alpha, 7.0 / 18.0);
        let ab = &r.pairs[0];
        assert_eq!(
            (ab.annotator_a.as_str(), ab.annotator_b.as_str(), ab.n),
            ("a", "b", 2)
        );
        close(ab.percent, 0.5);
        close(ab.cohen_kappa, 0.2);

        let out = consolidate(&rows, &schema, &rule(2, TieRule::Review));
        assert_eq!(
            out[0].consensus,
            Consensus::Label {
                labels: vec!["cat".into()],
                tie_broken: false
            }
        );
        assert_eq!(
            out[1].consensus,
            Consensus::Label {
                labels: vec!["dog".into()],
                tie_broken: false
            }
        );
        let agreement: Vec<(u64, u64)> = r.annotators.iter().map(|a| (a.n, a.agreed)).collect();
        assert_eq!(agreement, vec![(2, 1), (2, 1), (2, 2)]);

        // A fourth voter makes "dog" 2 of 4 on item 1: exactly the threshold, a tie.
        let mut tied = rows.clone();
        tied.push(row(1, "d", &["dog", "cat"]));
        let out = consolidate(&tied, &schema, &rule(2, TieRule::Review));
        assert_eq!(
            out[0].consensus,
            Consensus::Unresolved {
                candidates: vec!["dog".into()]
            }
        );
        let out = consolidate(&tied, &schema, &rule(2, TieRule::FirstInSchemaOrder));
        assert_eq!(
            out[0].consensus,
            Consensus::Label {
                labels: vec!["cat".into()],
                tie_broken: true
            }
        );
        // A lower threshold lets 1 of 3 in.
        let low = ConsolidationRule {
            multi_label_threshold: Threshold::new(0.3).expect("valid"),
            ..rule(2, TieRule::Review)
        };
        let out = consolidate(&rows, &schema, &low);
        assert_eq!(
            out[0].consensus,
            Consensus::Label {
                labels: vec!["cat".into(), "dog".into()],
                tie_broken: false
            }
        );
    }

    // N5: single-label per-label values are one-vs-rest binary agreement.
    #[test]
    fn single_label_one_vs_rest() {
        // Item 1: cat, cat; item 2: dog, bird; item 3: bird, bird.
        let rows = vec![
            row(1, "a", &["cat"]),
            row(1, "b", &["cat"]),
            row(2, "a", &["dog"]),
            row(2, "b", &["bird"]),
            row(3, "a", &["bird"]),
            row(3, "b", &["bird"]),
        ];
        let r = report(
            &rows,
            &single(&["cat", "dog", "bird"]),
            &ConsolidationRule::default(),
        );
        // cat vs rest: all three units unanimous.
        close(r.per_label[0].percent, 1.0);
        close(r.per_label[0].krippendorff_alpha, 1.0);
        // dog vs rest: item 2 splits → percent 2/3; n = 6, one present value:
        // α = 1 − 5·2/(36 − 26) = 0.
        close(r.per_label[1].percent, 2.0 / 3.0);
        close(r.per_label[1].krippendorff_alpha, 0.0);
        close(r.overall.percent, 2.0 / 3.0);
    }

    // N5: malformed rows are counted and left out, whatever their order.
    #[test]
    fn skipped_rows() {
        let rows = vec![
            row(1, "a", &["cat"]),
            row(1, "b", &["cat"]),
            row(1, "c", &["gone"]),
            row(1, "d", &["cat", "dog"]),
            row(1, "e", &[]),
            row(1, "f", &["cat"]),
            row(1, "f", &["dog"]),
        ];
        let r = report(
            &rows,
            &single(&["cat", "dog"]),
            &ConsolidationRule::default(),
        );
        assert_eq!(
            r.skipped,
            SkippedRows {
                unknown_label: 1,
                wrong_label_count: 2,
                duplicate: 2
            }
        );
        let names: Vec<&str> = r.annotators.iter().map(|a| a.annotator.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    // N5: thresholds outside [0, 1) are refused, also when deserialized.
    #[test]
    fn threshold_bounds() {
        assert!(Threshold::new(0.0).is_ok());
        assert!(Threshold::new(1.0).is_ok() && Threshold::new(1.01).is_err());
        assert!(Threshold::new(-0.1).is_err());
        assert!(Threshold::new(f64::NAN).is_err());
        let rule: ConsolidationRule =
            serde_json::from_str(r#"{"min_votes": 3, "tie_rule": "first_in_schema_order"}"#)
                .expect("defaults fill the rest");
        assert_eq!(rule.multi_label_threshold, Threshold::HALF);
        assert_eq!(rule.tie_rule, TieRule::FirstInSchemaOrder);
        assert!(
            serde_json::from_str::<ConsolidationRule>(r#"{"multi_label_threshold": 1.5}"#).is_err()
        );
    }

    // N5: the same rows in another order give a byte-identical report and consolidation,
    // so datasets built from them are reproducible.
    #[test]
    fn deterministic_under_shuffle() {
        let classes = ["a", "b", "c"];
        let mut rows = Vec::new();
        for item in 0..40i64 {
            for (k, annotator) in ["zoe", "amy", "max", "bob"].iter().enumerate() {
                // Spread labels unevenly and leave some ratings missing.
                if (item + k as i64) % 5 == 0 {
                    continue;
                }
                let label = classes[((item * 7 + k as i64 * 3) % 3) as usize];
                rows.push(row(item, annotator, &[label]));
            }
        }
        // A fixed permutation: reverse, then interleave halves.
        let mut shuffled: Vec<Row> = rows.iter().rev().cloned().collect();
        let half = shuffled.split_off(shuffled.len() / 2);
        let shuffled: Vec<Row> = half
            .into_iter()
            .zip(shuffled.iter().cloned())
            .flat_map(|(x, y)| [x, y])
            .chain(rows.iter().take(rows.len() % 2).cloned())
            .collect();
        assert_eq!(shuffled.len(), rows.len());
        assert_ne!(shuffled, rows);

        for schema in [single(&classes), multi(&classes)] {
            let rule = rule(2, TieRule::FirstInSchemaOrder);
            let one = serde_json::to_string(&report(&rows, &schema, &rule)).expect("serialize");
            let two = serde_json::to_string(&report(&shuffled, &schema, &rule)).expect("serialize");
            assert_eq!(one, two);
            let one =
                serde_json::to_string(&consolidate(&rows, &schema, &rule)).expect("serialize");
            let two =
                serde_json::to_string(&consolidate(&shuffled, &schema, &rule)).expect("serialize");
            assert_eq!(one, two);
        }
    }
}
