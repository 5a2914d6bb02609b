{{/*
Checks across values that a JSON schema cannot express. Every check adds its problems
to one list, and the render fails once with all of them, so an operator fixes a values
file in one pass instead of one error per install attempt.
*/}}
{{- define "freemask.validateValues" -}}
{{- $problems := list -}}
{{- range $check := list "images" "credentials" "grpcTls" "gpus" "replicas" "gracePeriods" "triton" "topics" }}
{{- $found := include (printf "freemask.validateValues.%s" $check) $ | trim -}}
{{- if $found }}
{{- $problems = append $problems $found -}}
{{- end }}
{{- end }}
{{- if $problems }}
{{- printf "\nVALUES VALIDATION:\n%s" (join "\n" $problems) | fail -}}
{{- end }}
{{- end -}}

{{/* A pinned tag on every image: an empty tag or `latest` would make two pods of one Deployment run different code. */}}
{{- define "freemask.validateValues.images" -}}
{{- $images := dict "image.gpu" .Values.image.gpu "image.cpu" .Values.image.cpu "triton.image" .Values.triton.image -}}
{{- range $name, $service := include "freemask.catalogue" . | fromYaml }}
{{- $override := (get $.Values $service.key).image | default dict -}}
{{- if hasKey $override "tag" }}
{{- $_ := set $images (printf "%s.image" $service.key) $override -}}
{{- end }}
{{- end }}
{{- range $path, $image := $images }}
{{- $tag := toString ($image.tag | default "") -}}
{{- if or (eq $tag "") (eq $tag "latest") }}
freemask: {{ $path }}.tag
    is {{ $tag | default "empty" | quote }}; pin a release tag (and optionally a digest) so every pod runs the same image
{{- end }}
{{- end }}
{{- end -}}

{{- define "freemask.validateValues.credentials" -}}
{{- $bus := .Values.config.bus | default dict -}}
{{- if not .Values.storeCredentials.existingSecret }}
freemask: storeCredentials.existingSecret
    name the Secret that holds the S3 access and secret keys; every service and Triton read the store with them
{{- end }}
{{- if include "freemask.saslEnabled" . }}
{{- if not .Values.kafkaCredentials.existingSecret }}
freemask: kafkaCredentials.existingSecret
    config.bus.security_protocol is {{ $bus.security_protocol }}: name the Secret with the SASL username and password
{{- end }}
{{- if not $bus.sasl_mechanism }}
freemask: config.bus.sasl_mechanism
    config.bus.security_protocol is {{ $bus.security_protocol }}: set PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
{{- end }}
{{- else if .Values.kafkaCredentials.existingSecret }}
freemask: kafkaCredentials.existingSecret
    is set but config.bus.security_protocol is {{ $bus.security_protocol | default "PLAINTEXT" }}; the Secret would be ignored (use SASL_SSL or SASL_PLAINTEXT)
{{- end }}
{{- end -}}

{{/* gRPC TLS is wired by the chart from one Secret; set by hand under config.server it would point at files no pod mounts. */}}
{{- define "freemask.validateValues.grpcTls" -}}
{{- if and .Values.grpcTls.enabled (not .Values.grpcTls.existingSecret) }}
freemask: grpcTls.existingSecret
    grpcTls.enabled is true: name the Secret with the services' certificate, its key and the CA
{{- end }}
{{- $server := .Values.config.server | default dict -}}
{{- range $key := list "tls_cert_file" "tls_key_file" "tls_client_ca_file" "tls_ca_file" "tls_client_cert_file" "tls_client_key_file" }}
{{- if hasKey $server $key }}
freemask: config.server.{{ $key }}
    is wired by the chart from the grpcTls Secret; use grpcTls instead
{{- end }}
{{- end }}
{{- end -}}

{{/* GPUs come from `<service>.gpu` only, and a service told to use CUDA must get one. */}}
{{- define "freemask.validateValues.gpus" -}}
{{- range $name, $service := include "freemask.catalogue" . | fromYaml }}
{{- $values := get $.Values $service.key -}}
{{- $resources := $values.resources | default dict -}}
{{- if or (hasKey ($resources.limits | default dict) "nvidia.com/gpu") (hasKey ($resources.requests | default dict) "nvidia.com/gpu") }}
freemask: {{ $service.key }}.resources
    names nvidia.com/gpu; set {{ $service.key }}.gpu instead (the chart puts it in both requests and limits)
{{- end }}
{{- $device := dig $name "device" "auto" $.Values.config -}}
{{- if and (eq $device "cuda") (lt (int $values.gpu) 1) }}
freemask: {{ $service.key }}.gpu
    is 0 but config.{{ $name }}.device is cuda: the pod would start without a GPU and fail
{{- end }}
{{- end }}
{{- end -}}

{{/*
Replicas per stage: a consumer group never uses more consumers than its topic has
partitions, so replicas past that only hold GPUs idle. The coordinator keeps one run
state in memory and must stay a single pod.
*/}}
{{- define "freemask.validateValues.replicas" -}}
{{- range $name, $service := include "freemask.catalogue" . | fromYaml }}
{{- $values := get $.Values $service.key -}}
{{- if $service.autoscaling }}
{{- $topic := first $service.topics -}}
{{- $partitions := include "freemask.partitionsOf" (dict "root" $ "topic" $topic) | int -}}
{{- $scaling := $values.autoscaling -}}
{{- $most := ternary (int $scaling.maxReplicas) (int $values.replicaCount) $scaling.enabled -}}
{{- $what := ternary "autoscaling.maxReplicas" "replicaCount" $scaling.enabled -}}
{{- if gt $most $partitions }}
freemask: {{ $service.key }}.{{ $what }}
    is {{ $most }} but {{ $topic }} has {{ $partitions }} partitions: raise config.bus.topic_partitions for it, or lower the replicas
{{- end }}
{{- if and $scaling.enabled (gt (int $scaling.minReplicas) (int $scaling.maxReplicas)) }}
freemask: {{ $service.key }}.autoscaling.minReplicas
    is {{ $scaling.minReplicas }}, above maxReplicas {{ $scaling.maxReplicas }}
{{- end }}
{{- if and $scaling.enabled (not $.Values.keda.enabled) (lt (int $scaling.minReplicas) 1) }}
freemask: {{ $service.key }}.autoscaling.minReplicas
    is 0, which only KEDA can scale from (keda.enabled); a HorizontalPodAutoscaler needs at least 1
{{- end }}
{{- else if ne (int $values.replicaCount) 1 }}
freemask: {{ $service.key }}.replicaCount
    must be 1: the {{ $name }} keeps its run state in one process
{{- end }}
{{- end }}
{{- end -}}

{{/* Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM; the service needs its drain time and then some. */}}
{{- define "freemask.validateValues.gracePeriods" -}}
{{- $drain := dig "server" "grace_period_s" 10 .Values.config | float64 -}}
{{- range $name, $service := include "freemask.catalogue" . | fromYaml }}
{{- $grace := (get $.Values $service.key).terminationGracePeriodSeconds | float64 -}}
{{- if le $grace $drain }}
freemask: {{ $service.key }}.terminationGracePeriodSeconds
    is {{ $grace }} s, not above config.server.grace_period_s ({{ $drain }} s): the pod would be killed while it finishes its message
{{- end }}
{{- end }}
{{- end -}}

{{- define "freemask.validateValues.triton" -}}
{{- if .Values.triton.enabled }}
{{- if lt (int .Values.triton.gpu) 1 }}
freemask: triton.gpu
    is 0, but the published FOPA model runs on Triton's GPU instance group; disable triton and set config.triton.url to run without one
{{- end }}
{{- else if or (not (dig "triton" "url" "" .Values.config)) (hasPrefix "127.0.0.1:" (dig "triton" "url" "" .Values.config)) }}
freemask: config.triton.url
    triton.enabled is false: set config.triton.url to the host:port of the Triton that serves FOPA
{{- end }}
{{- end -}}

{{- define "freemask.validateValues.topics" -}}
{{- $known := include "freemask.topics" . | fromYamlArray -}}
{{- range $topic, $count := dig "bus" "topic_partitions" dict .Values.config }}
{{- if not (has $topic $known) }}
freemask: config.bus.topic_partitions
    names {{ $topic }}, which is not a Free-Mask topic (known: {{ join ", " $known }})
{{- end }}
{{- end }}
{{- if and .Values.topics.create .Values.strimzi.enabled (not .Values.strimzi.clusterName) }}
freemask: strimzi.clusterName
    strimzi.enabled: name the Kafka cluster (the strimzi.io/cluster label) the KafkaTopics belong to
{{- end }}
{{- end -}}
