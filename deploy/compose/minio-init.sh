#!/bin/sh
# One-shot for the compose stack, run in MinIO's mc image: creates the bucket the
# services use and a MinIO user that may touch only that bucket, whose keys are the
# services' store credentials. Every step creates what is missing or overwrites it with
# the same thing, so the job can run on every `up`.
#
# Reads BUCKET and MINIO_URL from the environment, and the secrets minio_root_user,
# minio_root_password, store_access_key and store_secret_key from /run/secrets.
set -eu

secret() {
    cat "/run/secrets/$1"
}

policy_name="freemask-bucket"
access_key="$(secret store_access_key)"

mc alias set platform "$MINIO_URL" "$(secret minio_root_user)" "$(secret minio_root_password)" > /dev/null
mc mb --ignore-existing "platform/$BUCKET"

policy_file="$(mktemp)"
cat > "$policy_file" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:*"],
      "Resource": ["arn:aws:s3:::$BUCKET", "arn:aws:s3:::$BUCKET/*"]
    }
  ]
}
POLICY
mc admin policy create platform "$policy_name" "$policy_file"
rm -f "$policy_file"

# Adding an existing user updates its secret key, so a rotated secret file takes effect.
mc admin user add platform "$access_key" "$(secret store_secret_key)" > /dev/null
# Attaching a policy twice is an error, so look first.
case "$(mc admin policy entities platform --user "$access_key")" in
    *"$policy_name"*) ;;
    *) mc admin policy attach platform "$policy_name" --user "$access_key" ;;
esac
echo "bucket $BUCKET ready; its user may use only this bucket"
