//! Values of log fields. Numbers are logged as numbers, rounded to the digits worth reading,
//! so that text logs stay short (`loss=2.5132`) and JSON logs carry numbers log tools can
//! filter on (`"loss":2.5132`), not strings.

/// `value` rounded to `decimals` digits after the point.
pub fn rounded(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// An `f32` as the `f64` its shortest decimal reads as (`0.01`, not `0.009999999776482582`).
pub fn single(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(value as f64)
}

/// An error and its causes on one line, each cause once: a cause whose text its parent's
/// message already holds (decoders often repeat theirs) is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(text.trim()) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_the_digits_asked_and_prints_them_alone() {
        assert_eq!(rounded(2.513_249_7, 4), 2.5132);
        assert_eq!(format!("{:?}", rounded(0.909_09, 3)), "0.909");
        assert_eq!(format!("{:?}", rounded(381.54, 1)), "381.5");
        assert_eq!(rounded(1234.5678, 0), 1235.0);
        assert_eq!(format!("{:?}", single(0.01)), "0.01");
    }

    #[test]
    fn a_cause_repeated_by_its_parent_is_shown_once() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("Not enough bytes")
            }
        }
        impl std::error::Error for Inner {}
        #[derive(Debug)]
        struct Outer(Inner);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "Format error decoding Jpeg: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Outer(Inner)).context("decoding a.jpg");
        assert_eq!(
            error_chain(&e),
            "decoding a.jpg: Format error decoding Jpeg: Not enough bytes"
        );
    }
}
