//! When to try a failed delivery again.

use std::time::Duration;

/// The delay before the next attempt after `attempts_made` failed attempts, or
/// `None` when the schedule is used up and the delivery is dead. Each delay is
/// spread by up to 20% either way, so deliveries that failed together do not
/// all retry in the same instant.
pub fn next_delay(schedule: &[Duration], attempts_made: u32) -> Option<Duration> {
    let index = usize::try_from(attempts_made).ok()?.checked_sub(1)?;
    let base = *schedule.get(index)?;
    let factor = 0.8 + rand::random::<f64>() * 0.4;
    Some(base.mul_f64(factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_schedule_then_gives_up() {
        let schedule = [Duration::from_secs(5), Duration::from_secs(60)];
        for _ in 0..100 {
            let first = next_delay(&schedule, 1).unwrap();
            assert!(
                first >= Duration::from_secs(4) && first <= Duration::from_secs(6),
                "{first:?}"
            );
            let second = next_delay(&schedule, 2).unwrap();
            assert!(
                second >= Duration::from_secs(48) && second <= Duration::from_secs(72),
                "{second:?}"
            );
        }
        assert_eq!(next_delay(&schedule, 3), None);
        assert_eq!(next_delay(&[], 1), None);
    }
}
