//! A set of ports written the kernel's way (`8080,20000-29999`), as
//! `net.ipv4.ip_local_reserved_ports` holds them.

use std::{fmt, ops::RangeInclusive, str::FromStr};

/// A set of ports as sorted, disjoint, non-adjacent inclusive ranges, written the kernel's
/// way: `8080,20000-29999` (empty when there are none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRanges(Vec<(u16, u16)>);

impl PortRanges {
    /// No ports.
    #[must_use]
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// The ranges, `(first, last)`, sorted, apart from each other.
    #[must_use]
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    /// Whether there are no ports.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `port` is in the set.
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        let after = self.0.partition_point(|&(first, _)| first <= port);
        after > 0 && self.0[after - 1].1 >= port
    }

    /// Whether any port of `range` is in the set (never, for an empty range).
    #[must_use]
    pub fn overlaps(&self, range: RangeInclusive<u16>) -> bool {
        let (low, high) = (*range.start(), *range.end());
        low <= high
            && self
                .0
                .iter()
                .any(|&(first, last)| first <= high && last >= low)
    }

    /// The ports in either set.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        self.0.iter().chain(&other.0).copied().collect()
    }

    /// The ports in this set and not in `other`.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        let mut left = Vec::new();
        // `other`'s ranges ending before the current range starts; both sets are sorted.
        let mut skip = 0;
        for &(first, last) in &self.0 {
            while other.0.get(skip).is_some_and(|&(_, end)| end < first) {
                skip += 1;
            }
            // The first port of this range not yet known to be kept or removed.
            let mut next = Some(first);
            for &(start, end) in &other.0[skip..] {
                let Some(from) = next else { break };
                if start > last {
                    break;
                }
                if start > from {
                    left.push((from, start - 1));
                }
                next = end.checked_add(1).filter(|&port| port <= last);
            }
            if let Some(from) = next {
                left.push((from, last));
            }
        }
        Self(left)
    }
}

impl From<RangeInclusive<u16>> for PortRanges {
    fn from(range: RangeInclusive<u16>) -> Self {
        std::iter::once(range).collect()
    }
}

/// Collects ranges in any order, overlapping or not; empty ranges (`start > end`) add nothing.
impl FromIterator<RangeInclusive<u16>> for PortRanges {
    fn from_iter<I: IntoIterator<Item = RangeInclusive<u16>>>(iter: I) -> Self {
        iter.into_iter()
            .map(|range| (*range.start(), *range.end()))
            .collect()
    }
}

/// Collects `(first, last)` pairs in any order, overlapping or not; a pair with
/// `first > last` is an empty range and adds nothing.
impl FromIterator<(u16, u16)> for PortRanges {
    fn from_iter<I: IntoIterator<Item = (u16, u16)>>(iter: I) -> Self {
        let mut ranges: Vec<(u16, u16)> = iter
            .into_iter()
            .filter(|&(first, last)| first <= last)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                // Overlapping or adjacent (in u32: `last + 1` may be 65536).
                Some(previous) if u32::from(first) <= u32::from(previous.1) + 1 => {
                    previous.1 = previous.1.max(last);
                }
                _ => merged.push((first, last)),
            }
        }
        Self(merged)
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, &(first, last)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

/// Parses the kernel's format: ports and `first-last` ranges separated by commas, in any
/// order, overlapping or not. Surrounding whitespace (the trailing newline) and spaces around
/// items are ignored; an empty string is the empty set.
impl FromStr for PortRanges {
    type Err = ParsePortRangesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::new());
        }
        s.split(',')
            .map(|item| parse_item(s, item.trim()))
            .collect::<Result<Vec<(u16, u16)>, _>>()
            .map(|ranges| ranges.into_iter().collect())
    }
}

fn parse_item(whole: &str, item: &str) -> Result<(u16, u16), ParsePortRangesError> {
    if item.is_empty() {
        return Err(ParsePortRangesError::EmptyItem {
            list: whole.to_owned(),
        });
    }
    let (first, last) = if let Some((low, high)) = item.split_once('-') {
        (parse_port(low.trim())?, parse_port(high.trim())?)
    } else {
        let port = parse_port(item)?;
        (port, port)
    };
    if first > last {
        return Err(ParsePortRangesError::Backwards { first, last });
    }
    Ok((first, last))
}

fn parse_port(text: &str) -> Result<u16, ParsePortRangesError> {
    let not_a_port = || ParsePortRangesError::NotAPort {
        text: text.to_owned(),
    };
    // Digits only: `u16::from_str` would also take a leading `+`.
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(not_a_port());
    }
    text.parse().map_err(|_| not_a_port())
}

/// What is wrong with a written list of ports and ranges.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParsePortRangesError {
    /// Two commas in a row, or one at either end.
    #[error(
        "empty item in {list:?}: separate ports and ranges with single commas, as in \
         \"8080,20000-29999\""
    )]
    EmptyItem {
        /// The whole list.
        list: String,
    },
    /// Something that is not a port number where one belongs.
    #[error("{text:?} is not a port: write a whole number from 0 to 65535")]
    NotAPort {
        /// The text found.
        text: String,
    },
    /// A range whose first port is above its last.
    #[error("range {first}-{last} is backwards: write it as {last}-{first}")]
    Backwards {
        /// The first port written.
        first: u16,
        /// The last port written.
        last: u16,
    },
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ranges(text: &str) -> PortRanges {
        text.parse()
            .unwrap_or_else(|err| panic!("parsing {text:?}: {err}"))
    }

    #[test]
    fn port_ranges_parse_and_format_round_trip() {
        for text in [
            "",
            "0",
            "8080",
            "8080,20000-29999",
            "1-2,4,6-65535",
            "65535",
        ] {
            assert_eq!(ranges(text).to_string(), text);
        }
    }

    #[test]
    fn port_ranges_ignore_surrounding_whitespace() {
        assert!(ranges("\n").is_empty());
        assert!(ranges("  \t\n").is_empty());
        assert_eq!(ranges("8080,20000-29999\n").to_string(), "8080,20000-29999");
        assert_eq!(
            ranges(" 8080 , 20000 - 29999 ").to_string(),
            "8080,20000-29999"
        );
    }

    #[test]
    fn port_ranges_merge_overlapping_and_adjacent_ranges() {
        assert_eq!(ranges("10-20,15-30").ranges(), [(10, 30)]);
        assert_eq!(ranges("10-20,21-30").ranges(), [(10, 30)]);
        assert_eq!(ranges("5,6,7,9").ranges(), [(5, 7), (9, 9)]);
        assert_eq!(ranges("30-40,1-2,10-20").to_string(), "1-2,10-20,30-40");
        assert_eq!(ranges("10-20,12-14").ranges(), [(10, 20)]);
        assert_eq!(ranges("8080,8080").ranges(), [(8080, 8080)]);
        assert_eq!(ranges("65534,65535,0").to_string(), "0,65534-65535");
        assert_eq!(ranges("0-65535,7").ranges(), [(0, 65535)]);
    }

    #[test]
    fn port_ranges_reject_bad_input() {
        let error = |text: &str| {
            text.parse::<PortRanges>()
                .expect_err(&format!("{text:?} should not parse"))
        };
        for text in ["8080,", ",8080", "8080,,9090", " , "] {
            assert!(
                matches!(error(text), ParsePortRangesError::EmptyItem { .. }),
                "{text:?}"
            );
        }
        for (text, bad) in [
            ("65536", "65536"),
            ("http", "http"),
            ("-5", ""),
            ("+5", "+5"),
            ("1-2-3", "2-3"),
            ("10-", ""),
            ("1 2", "1 2"),
            ("0x50", "0x50"),
        ] {
            assert_eq!(
                error(text),
                ParsePortRangesError::NotAPort {
                    text: bad.to_owned()
                },
                "{text:?}"
            );
        }
        assert_eq!(
            error("30-20"),
            ParsePortRangesError::Backwards {
                first: 30,
                last: 20
            }
        );
        assert!(error("30-20").to_string().contains("write it as 20-30"));
    }

    #[test]
    fn port_ranges_contains_and_overlaps() {
        let set = ranges("8080,20000-29999,65535");
        for port in [8080, 20000, 25000, 29999, 65535] {
            assert!(set.contains(port), "{port}");
        }
        for port in [0, 8079, 8081, 19999, 30000, 65534] {
            assert!(!set.contains(port), "{port}");
        }
        assert!(!PortRanges::new().contains(0));
        assert!(set.overlaps(8000..=8080));
        assert!(set.overlaps(29999..=30000));
        assert!(set.overlaps(0..=65535));
        assert!(set.overlaps(65535..=65535));
        assert!(!set.overlaps(8081..=19999));
        assert!(!set.overlaps(30000..=65534));
        #[expect(
            clippy::reversed_empty_ranges,
            reason = "an empty range is the case under test"
        )]
        let empty = 25000..=20000;
        assert!(!set.overlaps(empty));
    }

    #[test]
    fn port_ranges_union() {
        assert_eq!(
            ranges("8080").union(&ranges("20000-20100")).to_string(),
            "8080,20000-20100"
        );
        assert_eq!(
            ranges("1-10,20-30").union(&ranges("11-19")).to_string(),
            "1-30"
        );
        assert_eq!(ranges("5-10").union(&PortRanges::new()), ranges("5-10"));
        assert_eq!(
            ranges("65535").union(&ranges("65534")).to_string(),
            "65534-65535"
        );
    }

    #[test]
    fn port_ranges_difference() {
        let cases = [
            // (set, minus, left)
            ("20000-20100", "8080", "20000-20100"),
            ("20000-20100", "20000-20100", ""),
            ("20000-20100", "0-65535", ""),
            ("20000-20100", "20050", "20000-20049,20051-20100"),
            ("20000-20100", "19000-20010,20090-21000", "20011-20089"),
            ("1-10,20-30", "5-25", "1-4,26-30"),
            ("1-10,20-30,40-50", "10-20", "1-9,21-30,40-50"),
            ("0-65535", "0,65535", "1-65534"),
            ("65535", "65535", ""),
            ("65530-65535", "65535", "65530-65534"),
            ("0-5", "0", "1-5"),
            ("8080", "", "8080"),
            ("", "8080", ""),
            ("1-100", "10-20,30-40,50-60", "1-9,21-29,41-49,61-100"),
        ];
        for (set, minus, left) in cases {
            assert_eq!(
                ranges(set).difference(&ranges(minus)).to_string(),
                left,
                "{set} minus {minus}"
            );
        }
    }

    /// The operations against a plain set of ports, on random sets crowding both ends of the
    /// port space, where the arithmetic could overflow.
    #[test]
    fn port_ranges_agree_with_a_set_of_ports() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

        let mut rng = StdRng::seed_from_u64(0x7067);
        // Both ends of a range on the same side, so the model sets stay small.
        let port = |rng: &mut StdRng, high: bool| {
            let offset = rng.random_range(0..24u16);
            if high { u16::MAX - offset } else { offset }
        };
        let random_set = |rng: &mut StdRng| -> Vec<(u16, u16)> {
            (0..rng.random_range(0..5))
                .map(|_| {
                    let high = rng.random_bool(0.5);
                    let (a, b) = (port(rng, high), port(rng, high));
                    if rng.random_bool(0.1) {
                        (a.max(b), a.min(b))
                    } else {
                        (a.min(b), a.max(b))
                    }
                })
                .collect()
        };
        let model = |pairs: &[(u16, u16)]| -> BTreeSet<u16> {
            pairs
                .iter()
                .flat_map(|&(first, last)| first..=last)
                .collect()
        };
        let ports_of = |set: &PortRanges| model(set.ranges());
        for _ in 0..2000 {
            let (a, b) = (random_set(&mut rng), random_set(&mut rng));
            let (set_a, set_b): (PortRanges, PortRanges) =
                (a.iter().copied().collect(), b.iter().copied().collect());
            let (model_a, model_b) = (model(&a), model(&b));

            assert_eq!(ports_of(&set_a), model_a, "{a:?}");
            // Normalized: sorted, and apart by at least one port.
            for pair in set_a.ranges().windows(2) {
                assert!(u32::from(pair[0].1) + 1 < u32::from(pair[1].0), "{set_a:?}");
            }
            assert_eq!(ranges(&set_a.to_string()), set_a);
            assert_eq!(
                ports_of(&set_a.union(&set_b)),
                &model_a | &model_b,
                "{a:?} | {b:?}"
            );
            assert_eq!(
                ports_of(&set_a.difference(&set_b)),
                &model_a - &model_b,
                "{a:?} - {b:?}"
            );
            let high = rng.random_bool(0.5);
            let probe = port(&mut rng, high);
            assert_eq!(set_a.contains(probe), model_a.contains(&probe));
            for &(first, last) in &b {
                assert_eq!(
                    set_a.overlaps(first..=last),
                    (first..=last).any(|port| model_a.contains(&port)),
                    "{a:?} overlaps {first}..={last}"
                );
            }
        }
    }

    #[test]
    fn port_ranges_from_pairs_skip_empty_ranges() {
        let set: PortRanges = [(30, 20), (5, 5), (1, 3)].into_iter().collect();
        assert_eq!(set.to_string(), "1-3,5");
    }
}
