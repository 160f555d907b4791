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
}
