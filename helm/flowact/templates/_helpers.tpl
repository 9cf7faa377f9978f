{{/*
Names, labels and the few values every template shares. Ports and paths that the image's
`flowact` CLI agrees on are written here once.
*/}}

{{- define "flowact.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowact.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flowact.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowact.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowact.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flowact.labels" -}}
helm.sh/chart: {{ include "flowact.chart" . }}
{{ include "flowact.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flowact.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowact.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "flowact.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Container ports of Triton (fixed by the image's `flowact serve` invocation). */}}
{{- define "flowact.port.http" -}}8000{{- end }}
{{- define "flowact.port.grpc" -}}8001{{- end }}
{{- define "flowact.port.metrics" -}}8002{{- end }}
{{- define "flowact.port.health" -}}8003{{- end }}

{{/* Paths inside the pod. */}}
{{- define "flowact.runDir" -}}/run/flowact{{- end }}
{{- define "flowact.drainFile" -}}/run/flowact/draining{{- end }}
{{- define "flowact.cacheDir" -}}/var/cache/flowact{{- end }}
{{- define "flowact.tlsDir" -}}/etc/flowact/tls{{- end }}
{{- define "flowact.testTlsDir" -}}/etc/flowact/test-tls{{- end }}
{{- define "flowact.scriptsDir" -}}/opt/flowact-chart{{- end }}

{{/* The model repository Triton loads: a link made by the export init container, or the mounted volume. */}}
{{- define "flowact.repositoryPath" -}}
{{- if eq .Values.modelRepository.source "export" -}}
/run/flowact/repository
{{- else -}}
{{- printf "/models/%s" .Values.modelRepository.subPath | trimSuffix "/" -}}
{{- end }}
{{- end }}

{{/* Pod termination budget: the drain deadline plus Triton's own shutdown. */}}
{{- define "flowact.terminationGracePeriodSeconds" -}}
{{- add .Values.drain.deadlineSeconds .Values.drain.shutdownMarginSeconds }}
{{- end }}

{{/* Label matchers selecting this release's series in Prometheus. */}}
{{- define "flowact.metricSelector" -}}
{{- if .Values.prometheusRule.metricSelector }}
{{- .Values.prometheusRule.metricSelector }}
{{- else }}
{{- printf "namespace=%q,service=%q" .Release.Namespace (include "flowact.fullname" .) }}
{{- end }}
{{- end }}

{{/* GPU resources added to a container's resources. */}}
{{- define "flowact.resources" -}}
{{- $res := deepCopy .resources }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .gpu.resourceName .gpu.count }}
{{- $_ := set $res "limits" $limits }}
{{- toYaml $res }}
{{- end }}

{{/* The secret whose ca.crt (and, for mutual TLS, client key pair) the test pod uses. */}}
{{- define "flowact.testTlsSecret" -}}
{{- default .Values.tls.secretName .Values.tls.testClientSecretName }}
{{- end }}

{{/* The Secret holding the admin key (FLOWACT_ADMIN_KEY), or "" when the server keeps a random one. */}}
{{- define "flowact.adminKeySecret" -}}
{{- if .Values.adminKey.existingSecret }}
{{- .Values.adminKey.existingSecret }}
{{- else if .Values.adminKey.create }}
{{- printf "%s-admin-key" (include "flowact.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
