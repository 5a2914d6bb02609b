{{/*
Helpers shared by every template. The chart has three kinds of workload: the six
services (one Deployment each, described by "freemask.catalogue"), Triton, and the
hook Jobs (topics, Triton's model publish).
*/}}

{{/* The chart name, unless nameOverride replaces it. */}}
{{- define "freemask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every resource name: "<release>-<chart>", or the release alone when it
already contains the chart name (a release called "freemask" gives "freemask-coordinator",
not "freemask-freemask-coordinator").
*/}}
{{- define "freemask.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "freemask.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", the name of a component's Deployment, Service, PDB, ... */}}
{{- define "freemask.componentName" -}}
{{- printf "%s-%s" (include "freemask.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one component's pods; never change them, Deployments' selectors are immutable. */}}
{{- define "freemask.selectorLabels" -}}
app.kubernetes.io/name: {{ include "freemask.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of a component's resources. */}}
{{- define "freemask.labels" -}}
{{ include "freemask.selectorLabels" . }}
app.kubernetes.io/part-of: freemask
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
metadata of a component's resource: its name (`name`, else "<fullname>-<component>"),
namespace, labels with any extra `labels`, and commonAnnotations with any extra `annotations`.
*/}}
{{- define "freemask.metadata" -}}
name: {{ .name | default (include "freemask.componentName" .) }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "freemask.labels" . | nindent 2 }}
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (deepCopy (.annotations | default dict)) (deepCopy .root.Values.commonAnnotations) }}
annotations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "freemask.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "freemask.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The six services. `key` is the service's section in values, `component` its Kubernetes
name, `topics` what its stage worker consumes (its KEDA triggers and the partitions that
bound its replicas), and the ports are the config's defaults (services/shared/config.py:
gRPC 50051 and metrics 9400 onwards in SERVICE_NAMES order), which config.server.ports
overrides.
*/}}
{{- define "freemask.catalogue" -}}
attention_mask: {key: attentionMask, component: attention-mask, image: gpu, autoscaling: true, grpc_port: 50051, metrics_port: 9400, topics: [freemask.generate.v1]}
thesaurus: {key: thesaurus, component: thesaurus, image: cpu, autoscaling: true, grpc_port: 50052, metrics_port: 9401, topics: [freemask.compose.v1]}
placement: {key: placement, component: placement, image: gpu, autoscaling: true, grpc_port: 50053, metrics_port: 9402, topics: [freemask.place.v1]}
harmonization: {key: harmonization, component: harmonization, image: gpu, autoscaling: true, grpc_port: 50054, metrics_port: 9403, topics: [freemask.harmonize.v1]}
scoring: {key: scoring, component: scoring, image: gpu, autoscaling: true, grpc_port: 50055, metrics_port: 9404, topics: [freemask.composed.v1]}
coordinator: {key: coordinator, component: coordinator, image: cpu, autoscaling: false, grpc_port: 50056, metrics_port: 9405, topics: [freemask.singles.v1, freemask.scored.v1, freemask.dlq.v1]}
{{- end -}}

{{/* Every topic of the platform (freemask.shared.bus.Topics.ALL). */}}
{{- define "freemask.topics" -}}
- freemask.generate.v1
- freemask.singles.v1
- freemask.compose.v1
- freemask.place.v1
- freemask.harmonize.v1
- freemask.composed.v1
- freemask.scored.v1
- freemask.samples.accepted.v1
- freemask.dlq.v1
{{- end -}}

{{/* Each service's gRPC and metrics ports: the defaults, with config.server.ports over them. */}}
{{- define "freemask.ports" -}}
{{- $given := dig "server" "ports" dict .Values.config -}}
{{- $ports := dict -}}
{{- range $name, $service := include "freemask.catalogue" . | fromYaml }}
{{- $defaults := dict "grpc_port" $service.grpc_port "metrics_port" $service.metrics_port -}}
{{- $_ := set $ports $name (mergeOverwrite $defaults (deepCopy (get $given $name | default dict))) -}}
{{- end }}
{{- toYaml $ports -}}
{{- end -}}

{{/* The Service address of the scoring service, which the coordinator calls over gRPC. */}}
{{- define "freemask.scoringTarget" -}}
{{- $ports := include "freemask.ports" . | fromYaml -}}
{{- printf "%s:%v" (include "freemask.componentName" (dict "root" . "component" "scoring")) $ports.scoring.grpc_port -}}
{{- end -}}

{{/* Where the services reach Triton: the chart's own, or config.triton.url when triton.enabled is off. */}}
{{- define "freemask.tritonGrpcTarget" -}}
{{- if .Values.triton.enabled -}}
{{- printf "%s:8001" (include "freemask.componentName" (dict "root" . "component" "triton")) -}}
{{- else -}}
{{- dig "triton" "url" "" .Values.config -}}
{{- end -}}
{{- end -}}

{{/* Mount points of the Secrets the services read through *_file settings. */}}
{{- define "freemask.storeSecretDir" -}}/etc/freemask/secrets/store{{- end -}}
{{- define "freemask.kafkaSecretDir" -}}/etc/freemask/secrets/kafka{{- end -}}
{{- define "freemask.configDir" -}}/etc/freemask/config{{- end -}}
{{- define "freemask.grpcTlsDir" -}}/etc/freemask/secrets/grpc-tls{{- end -}}

{{- define "freemask.saslEnabled" -}}
{{- if hasPrefix "SASL_" (dig "bus" "security_protocol" "PLAINTEXT" .Values.config) -}}true{{- end -}}
{{- end -}}

{{/*
freemask.yaml, the file every pod reads through FREEMASK_CONFIG: what the chart wires
(listen address, ports, in-cluster addresses, secret file paths, weight volumes) with
the operator's `config` merged over it, so an explicit setting always wins.
*/}}
{{- define "freemask.config" -}}
{{- $wired := dict "server" (dict "host" "0.0.0.0" "ports" (include "freemask.ports" . | fromYaml)) -}}
{{- $_ := set $wired "coordinator" (dict "scoring_target" (include "freemask.scoringTarget" .)) -}}
{{- with .Values.grpcTls }}
{{- if .enabled -}}
{{- $dir := include "freemask.grpcTlsDir" $ -}}
{{- $tls := dict "tls_cert_file" (printf "%s/%s" $dir .certKey) "tls_key_file" (printf "%s/%s" $dir .keyKey) "tls_ca_file" (printf "%s/%s" $dir .caKey) -}}
{{- if .mutual -}}
{{- /* one certificate per release: the services show it as clients too */}}
{{- $tls = merge $tls (dict "tls_client_ca_file" (printf "%s/%s" $dir .caKey) "tls_client_cert_file" (printf "%s/%s" $dir .certKey) "tls_client_key_file" (printf "%s/%s" $dir .keyKey)) -}}
{{- end -}}
{{- $_ := set $wired "server" (merge $wired.server $tls) -}}
{{- end -}}
{{- end }}
{{- if .Values.triton.enabled -}}
{{- $_ := set $wired "triton" (dict "url" (include "freemask.tritonGrpcTarget" .)) -}}
{{- end -}}
{{- $storeDir := include "freemask.storeSecretDir" . -}}
{{- $_ := set $wired "store" (dict "access_key_file" (printf "%s/%s" $storeDir .Values.storeCredentials.accessKeyKey) "secret_key_file" (printf "%s/%s" $storeDir .Values.storeCredentials.secretKeyKey)) -}}
{{- if include "freemask.saslEnabled" . -}}
{{- $_ := set $wired "bus" (dict "sasl_password_file" (printf "%s/%s" (include "freemask.kafkaSecretDir" .) .Values.kafkaCredentials.passwordKey)) -}}
{{- end -}}
{{- range $name, $section := dict "attention_mask" .Values.attentionMask.weights "harmonization" .Values.harmonization.weights }}
{{- if $section.existingClaim -}}
{{- $_ := set $wired $name (dict "weights" $section.mountPath) -}}
{{- end -}}
{{- end }}
{{- toYaml (mergeOverwrite $wired (deepCopy .Values.config)) -}}
{{- end -}}

{{/*
An image reference from {registry, repository, tag, digest}; `override` (a service's own
`image`) wins key by key over `base`. A digest pins the exact image, the tag stays for readers.
*/}}
{{- define "freemask.image" -}}
{{- $image := mergeOverwrite (deepCopy .base) (deepCopy (.override | default dict)) -}}
{{- $name := $image.repository -}}
{{- if $image.registry -}}
{{- $name = printf "%s/%s" $image.registry $name -}}
{{- end -}}
{{- $name = printf "%s:%s" $name (toString $image.tag) -}}
{{- if $image.digest -}}
{{- $name = printf "%s@%s" $name $image.digest -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/*
What every pod of the chart shares: a service account (`account`) without a token, as
nothing here talks to the Kubernetes API; the security context; the pull secrets.
*/}}
{{- define "freemask.podSecurity" -}}
serviceAccountName: {{ .account }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
Environment of every freemask container. The root filesystem is read-only, so every
library cache goes to the /tmp emptyDir; the hub variables make a missing local weight
fail at once instead of reaching for a network that is not there.
*/}}
{{- define "freemask.env" -}}
- name: FREEMASK_CONFIG
  value: {{ include "freemask.configDir" . }}/freemask.yaml
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
- name: TORCH_HOME
  value: /tmp/torch
- name: MPLCONFIGDIR
  value: /tmp/mpl
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- if include "freemask.saslEnabled" . }}
{{- /* the config has no *_file variant for the username, so it comes as an env override */}}
- name: FREEMASK_BUS__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafkaCredentials.existingSecret }}
      key: {{ .Values.kafkaCredentials.usernameKey }}
{{- end }}
{{- end -}}

{{/* Volumes every freemask pod mounts: its config, the credentials and a writable /tmp. `configMap` names the ConfigMap. */}}
{{- define "freemask.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: store-credentials
  secret:
    secretName: {{ .root.Values.storeCredentials.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .root.Values.storeCredentials.accessKeyKey }}
        path: {{ .root.Values.storeCredentials.accessKeyKey }}
      - key: {{ .root.Values.storeCredentials.secretKeyKey }}
        path: {{ .root.Values.storeCredentials.secretKeyKey }}
{{- if include "freemask.saslEnabled" .root }}
- name: kafka-credentials
  secret:
    secretName: {{ .root.Values.kafkaCredentials.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .root.Values.kafkaCredentials.passwordKey }}
        path: {{ .root.Values.kafkaCredentials.passwordKey }}
{{- end }}
{{- with .root.Values.grpcTls }}
{{- if .enabled }}
- name: grpc-tls
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      {{- range $key := list .certKey .keyKey .caKey }}
      - key: {{ $key }}
        path: {{ $key }}
      {{- end }}
{{- end }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- end -}}

{{- define "freemask.volumeMounts" -}}
- name: config
  mountPath: {{ include "freemask.configDir" . }}
  readOnly: true
- name: store-credentials
  mountPath: {{ include "freemask.storeSecretDir" . }}
  readOnly: true
{{- if include "freemask.saslEnabled" . }}
- name: kafka-credentials
  mountPath: {{ include "freemask.kafkaSecretDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.grpcTls.enabled }}
- name: grpc-tls
  mountPath: {{ include "freemask.grpcTlsDir" . }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* resources with `gpu` nvidia.com/gpu added to requests and limits (an extended resource needs both equal). */}}
{{- define "freemask.resources" -}}
{{- $resources := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpu) 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpu)) ($resources.limits | default dict)) -}}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" (int .gpu)) ($resources.requests | default dict)) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Partitions of a topic: config.bus.topic_partitions, else config.bus.partitions (BusConfig.partitions_of). */}}
{{- define "freemask.partitionsOf" -}}
{{- $bus := .root.Values.config.bus | default dict -}}
{{- $counts := $bus.topic_partitions | default dict -}}
{{- if hasKey $counts .topic -}}
{{- get $counts .topic | int -}}
{{- else -}}
{{- $bus.partitions | default 3 | int -}}
{{- end -}}
{{- end -}}

{{/* The --model-repository of the chart's Triton: placement/publish.py repository_url, written in template form. */}}
{{- define "freemask.tritonRepositoryUrl" -}}
{{- $store := .Values.config.store | default dict -}}
{{- $secure := $store.secure | default false -}}
{{- $endpoint := $store.endpoint -}}
{{- if not (contains ":" $endpoint) -}}
{{- $endpoint = printf "%s:%s" $endpoint (ternary "443" "80" $secure) -}}
{{- end -}}
{{- $path := printf "%s%s" ($store.prefix | default "") (trimSuffix "/" .Values.triton.modelRepository.prefix) -}}
{{- printf "s3://%s%s/%s/%s" (ternary "https://" "http://" $secure) $endpoint ($store.bucket | default "freemask") $path -}}
{{- end -}}

{{/* Where and how long a workload's pods run: the per-component scheduling values. */}}
{{- define "freemask.scheduling" -}}
terminationGracePeriodSeconds: {{ .terminationGracePeriodSeconds }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod labels: the component's labels and its podLabels. */}}
{{- define "freemask.podLabels" -}}
{{ include "freemask.labels" .ctx }}
{{- with .values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A memory-backed /dev/shm of the given size: its volume, and its mount. */}}
{{- define "freemask.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}
{{- define "freemask.shmMount" -}}
- name: dshm
  mountPath: /dev/shm
{{- end -}}

{{/*
How the kubelet asks a service's health (`service`, on `port`). The kubelet's gRPC probe
speaks plaintext only, so with grpcTls the container asks itself with `freemask health`,
which reads the TLS settings from the same config, within half the probe's timeout.
*/}}
{{- define "freemask.healthCheck" -}}
{{- if .root.Values.grpcTls.enabled -}}
exec:
  command: ["freemask", "health", {{ .service | quote }}, "--timeout", {{ max 1 (div (int .timing.timeoutSeconds) 2) | quote }}]
{{- else -}}
grpc:
  port: {{ .port }}
{{- end -}}
{{- end -}}

{{/* The shared probe timings with a component's `probes` over them. */}}
{{- define "freemask.probes" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.probes) (deepCopy (.values.probes | default dict))) -}}
{{- end -}}

{{/*
Egress rules of the network policies. Kafka and the store are outside the chart, so
they are reached by port (taken from the config's addresses) and, where
networkPolicy.*.to names them, by peer.
*/}}
{{- define "freemask.egress.dns" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}

{{/* The ports of a comma-separated host:port list; `default` where an address names none. */}}
{{- define "freemask.portsOf" -}}
{{- $ports := list -}}
{{- range $address := splitList "," .addresses -}}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" (trim $address)) -}}
{{- $ports = append $ports (int (default $.default $port)) -}}
{{- end -}}
{{- toYaml (uniq $ports) -}}
{{- end -}}

{{- define "freemask.egress.kafka" -}}
{{- $bus := .Values.config.bus | default dict -}}
{{- $ports := include "freemask.portsOf" (dict "addresses" $bus.bootstrap_servers "default" "9092") | fromYamlArray -}}
- ports:
    {{- range $port := uniq (concat $ports .Values.networkPolicy.kafka.extraPorts) }}
    - port: {{ $port }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.kafka.to }}
  to: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "freemask.egress.store" -}}
{{- $store := .Values.config.store | default dict -}}
{{- $default := ternary "443" "80" ($store.secure | default false) -}}
- ports:
    {{- range $port := include "freemask.portsOf" (dict "addresses" $store.endpoint "default" $default) | fromYamlArray }}
    - port: {{ $port }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.store.to }}
  to: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
