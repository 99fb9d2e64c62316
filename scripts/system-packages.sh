# Sourced by scripts/test: the Debian packages some tests drive for real (Chromium for the
# dashboard's browser tests, Ruby's Sidekiq for the Sidekiq tests). Missing ones are installed
# with apt-get when this runs as root or with password-less sudo; otherwise the run stops here
# with the command to type, rather than skipping those tests.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
for package in ruby-sidekiq ruby-faraday; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "scripts/test: the tests need Debian packages: sudo apt-get install ${missing[*]}" >&2
    exit 2
  fi
  echo "scripts/test: installing ${missing[*]} (apt-get)"
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
