# Sourced by the bench scripts: `bench_certs DIR` writes a throwaway CA
# (DIR/cert.pem, what clients trust; DIR/ca-key.pem) and a leaf for
# localhost and 127.0.0.1 signed by it (DIR/leaf.pem, DIR/key.pem).
bench_certs() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    -keyout "$dir/ca-key.pem" -out "$dir/cert.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$dir/key.pem" -out "$dir/leaf.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$dir/leaf.ext"
  openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/cert.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$dir/leaf.ext" -out "$dir/leaf.pem" 2>/dev/null
}
