//! Markdown tables for the terminal, number formatting, and latency percentiles.

use std::time::Duration;

/// A Markdown table, printed with padded columns so it reads in a terminal
/// and pastes into a Markdown file unchanged.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|header| header.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.headers.iter().map(|header| header.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        println!();
        println!("{}", line(&self.headers));
        let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
        println!("|-{}-|", rule.join("-|-"));
        for row in &self.rows {
            println!("{}", line(row));
        }
        println!();
    }
}

/// Formats an integer with thousands separators: 1234567 becomes "1,234,567".
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Formats a rate or count rounded to a whole number, with thousands separators.
pub fn whole(value: f64) -> String {
    if value.is_finite() && value >= 0.0 {
        thousands(value.round() as u64)
    } else {
        format!("{value:.0}")
    }
}

/// Formats a change relative to a baseline as a signed percentage.
pub fn percent_change(value: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        return "n/a".to_string();
    }
    format!("{:+.1}%", (value / baseline - 1.0) * 100.0)
}

pub fn milliseconds(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

pub fn megabytes(kilobytes: u64) -> String {
    format!("{:.1} MB", kilobytes as f64 / 1024.0)
}

/// Commit-to-arrival latencies of a set of expected webhooks. A webhook that
/// never arrived counts as slower than every one that did, so a percentile
/// that falls among them reads "not arrived" instead of hiding the loss.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Latencies of the webhooks that arrived, sorted.
    sorted: Vec<Duration>,
    pub missing: usize,
    /// Arrivals timed before their commit returned, counted as 0.
    pub negative: usize,
}

impl Latencies {
    pub fn new(mut arrived: Vec<Duration>, missing: usize, negative: usize) -> Latencies {
        arrived.sort_unstable();
        Latencies {
            sorted: arrived,
            missing,
            negative,
        }
    }

    pub fn expected(&self) -> usize {
        self.sorted.len() + self.missing
    }

    pub fn arrived(&self) -> usize {
        self.sorted.len()
    }

    /// Returns the nearest-rank percentile over all expected webhooks, or None when it
    /// falls among the ones that never arrived.
    pub fn percentile(&self, fraction: f64) -> Option<Duration> {
        let total = self.expected();
        if total == 0 {
            return None;
        }
        let rank = ((fraction * total as f64).ceil() as usize).clamp(1, total);
        self.sorted.get(rank - 1).copied()
    }

    pub fn max(&self) -> Option<Duration> {
        if self.missing > 0 {
            None
        } else {
            self.sorted.last().copied()
        }
    }

    pub fn describe(value: Option<Duration>) -> String {
        value.map(milliseconds).unwrap_or_else(|| "not arrived".to_string())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |value: Option<Duration>| value.map(|duration| duration.as_secs_f64() * 1000.0);
        serde_json::json!({
            "expected": self.expected(),
            "arrived": self.arrived(),
            "missing": self.missing,
            "negative_clamped": self.negative,
            "p50_ms": ms(self.percentile(0.50)),
            "p99_ms": ms(self.percentile(0.99)),
            "max_ms": ms(self.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_inserts_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn percentile_counts_missing_as_slowest() {
        let arrived: Vec<Duration> = (1..=98).map(Duration::from_millis).collect();
        let latencies = Latencies::new(arrived, 2, 0);
        assert_eq!(latencies.percentile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(latencies.percentile(0.98), Some(Duration::from_millis(98)));
        assert_eq!(latencies.percentile(0.99), None);
        assert_eq!(latencies.max(), None);
    }
}
