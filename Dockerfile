# syntax=docker/dockerfile:1
# One image, one binary: `mailauth-operator controller` runs the operator and
# `mailauth-operator relay` the signing relay (MailRelay pods use this image
# unless they name another). Build: docker build -t mailauth-operator .

# The toolchain the crate declares (rust-version = 1.95). The image's gcc is
# all aws-lc-sys (the one crypto backend) needs to compile its C.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The same command as `make build`; --locked builds exactly Cargo.lock. The
# cache mount keeps downloaded crates between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked

# glibc and libgcc only: no shell, no package manager; uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/mailauth-operator /usr/local/bin/mailauth-operator
USER 65532:65532
# The relay's submission port and the admin port (/metrics, /healthz, /readyz).
EXPOSE 587 8080
ENTRYPOINT ["/usr/local/bin/mailauth-operator"]
CMD ["controller"]
