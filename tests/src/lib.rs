//! KMS twin and hang lab: skeleton, filled in by issue #4.
