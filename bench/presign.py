#!/usr/bin/env python3
"""bench/presign.py — URLs that carry their own authorisation, for the peers
of bench/origins.sh that can only GET a plain URL (qemu's curl driver,
nbdkit's curl plugin). Standard library only.

  presign.py s3 URL ACCESS_KEY SECRET_KEY [REGION] [EXPIRES_S]
      An S3 URL (path style, http://HOST:PORT/BUCKET/KEY) presigned with AWS
      Signature Version 4 in the query string (X-Amz-Algorithm ...
      X-Amz-Signature), service "s3", signed header "host" only, payload
      UNSIGNED-PAYLOAD. REGION us-east-1, EXPIRES_S 3600 (S3's maximum is
      604800). Method GET: a request of another method (HEAD) is refused by
      S3 servers that check the signature's method.
  presign.py swift URL TEMP_URL_KEY [EXPIRES_S] [DIGEST]
      A Swift temp URL: URL is the object's full URL (.../v1/ACCOUNT/CONTAINER/
      OBJECT); temp_url_sig = HMAC-DIGEST(key, "GET\\nEXPIRES\\nPATH"), DIGEST
      sha256 (or sha1, sha512), EXPIRES_S 3600. Swift lets a GET temp URL do
      HEAD too.

Prints the URL. The keys are arguments only because the bench runs on
loopback against servers it made up itself, with throw-away keys.
"""
import datetime
import hashlib
import hmac
import sys
import time
import urllib.parse


def q(s, safe="-_.~"):
    return urllib.parse.quote(s, safe=safe)


def s3_presign(url, ak, sk, region="us-east-1", expires=3600, method="GET", now=None):
    u = urllib.parse.urlsplit(url)
    if u.query:
        sys.exit("presign: the S3 URL must have no query")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{ak}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(int(expires)),
        "X-Amz-SignedHeaders": "host",
    }
    # canonical URI: every path segment URI-encoded once (S3 does not encode twice)
    path = "/".join(q(urllib.parse.unquote(p)) for p in (u.path or "/").split("/"))
    cq = "&".join(f"{q(k)}={q(v)}" for k, v in sorted(params.items()))
    host = u.netloc.rsplit("@", 1)[-1]
    creq = "\n".join([method, path, cq, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
    key = ("AWS4" + sk).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, f"{cq}&X-Amz-Signature={sig}", ""))


def swift_temp_url(url, key, expires=3600, digest="sha256", method="GET"):
    u = urllib.parse.urlsplit(url)
    if u.query:
        sys.exit("presign: the Swift URL must have no query")
    exp = int(time.time()) + int(expires)
    # Swift signs the path as the client sends it (URL-quoted)
    body = f"{method}\n{exp}\n{u.path}"
    sig = hmac.new(key.encode(), body.encode(), getattr(hashlib, digest)).hexdigest()
    return urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, f"temp_url_sig={sig}&temp_url_expires={exp}", ""))


def main(argv):
    if len(argv) >= 4 and argv[0] == "s3":
        print(s3_presign(argv[1], argv[2], argv[3], *(argv[4:5] or ["us-east-1"]),
                         **({"expires": int(argv[5])} if len(argv) > 5 else {})))
    elif len(argv) >= 3 and argv[0] == "swift":
        print(swift_temp_url(argv[1], argv[2], *[int(argv[3])] if len(argv) > 3 else [],
                             **({"digest": argv[4]} if len(argv) > 4 else {})))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
