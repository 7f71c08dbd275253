# The decision document (policies/README.md): what identityd evaluates.
#
# `reasons` is one partial set that every module adds to; the decision allows
# exactly when it is empty and the grant below could be computed.
package identityd

import rego.v1

decision := {
	"allow": allow,
	"reasons": sort([reason | some reason in reasons]),
	"attributes": granted,
}

default allow := false

allow if {
	count(reasons) == 0
	count(granted) > 0
}

default granted := {}

granted := {
	"certExpiryTime": format_int(cert_expiry_minutes, 10),
	"certRefresh": cert_refresh,
	"certUsage": str(cfg, "cert_usage"),
} if {
	count(reasons) == 0
	is_number(cert_expiry_minutes)
}

# The configured lifetime, or a shorter one a pod asks for with the annotation
# identityd.io/cert-expiry-minutes (never a longer one).
cert_expiry_minutes := pod_expiry_minutes if {
	pod_expiry_minutes < cfg.cert_expiry_minutes
} else := cfg.cert_expiry_minutes

pod_expiry_minutes := to_number(text) if {
	text := pod.annotations["identityd.io/cert-expiry-minutes"]
	is_string(text)
	regex.match(`^[1-9][0-9]{0,5}$`, text)
}

default cert_refresh := "false"

cert_refresh := "true" if refresh_allowed
