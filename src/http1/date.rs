//! The `Date` header (RFC 9110 6.6.1) that an origin's answer carries and
//! that hyper adds to every response: formatted once a second per thread,
//! not once per answer.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    /// The second it was formatted for, and `date: <IMF-fixdate>\r\n`.
    static CACHED: RefCell<(u64, [u8; 37])> = const { RefCell::new((u64::MAX, [0; 37])) };
}

/// Appends `date: Sun, 06 Nov 1994 08:49:37 GMT\r\n` for now to `out`.
pub fn write_header(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now {
            c.1 = header_for(now);
            c.0 = now;
        }
        out.extend_from_slice(&c.1);
    });
}

/// The header line for `secs` after the Unix epoch.
fn header_for(secs: u64) -> [u8; 37] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let mut line = *b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n";
    line[6..9].copy_from_slice(DAYS[(days % 7) as usize]);
    two(&mut line[11..13], day);
    line[14..17].copy_from_slice(MONTHS[(month - 1) as usize]);
    two(&mut line[18..20], (year / 100) as u32);
    two(&mut line[20..22], (year % 100) as u32);
    two(&mut line[23..25], (rem / 3600) as u32);
    two(&mut line[26..28], (rem / 60 % 60) as u32);
    two(&mut line[29..31], (rem % 60) as u32);
    line
}

fn two(out: &mut [u8], n: u32) {
    out[0] = b'0' + (n / 10 % 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

/// Year, month (1–12) and day (1–31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imf_fixdate() {
        assert_eq!(&header_for(0), b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n");
        assert_eq!(
            &header_for(784_111_777),
            b"date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        );
        // A leap day and the turn of a century.
        assert_eq!(
            &header_for(951_782_400),
            b"date: Tue, 29 Feb 2000 00:00:00 GMT\r\n"
        );
        assert_eq!(
            &header_for(4_102_444_799),
            b"date: Thu, 31 Dec 2099 23:59:59 GMT\r\n"
        );
    }
}
