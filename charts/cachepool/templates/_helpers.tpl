{{/* Names, labels and the image, shared by every template. */}}

{{- define "cachepool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cachepool.fullname" -}}
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

{{- define "cachepool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cachepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "operator"). */}}
{{- define "cachepool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cachepool.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cachepool.componentLabels" -}}
{{ include "cachepool.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cachepool.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "cachepool.secretName" -}}
{{- default (printf "%s-auth" (include "cachepool.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "cachepool.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "cachepool.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cachepool.webServiceAccount" -}}
{{- if .Values.web.serviceAccount.create }}
{{- default (printf "%s-web" (include "cachepool.fullname" .)) .Values.web.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.web.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's API inside the cluster. */}}
{{- define "cachepool.operatorUrl" -}}
{{- printf "http://%s-operator.%s.svc:%v" (include "cachepool.fullname" .) .Release.Namespace .Values.operator.service.port }}
{{- end }}

{{/* Restricted pod security: every container runs as this. */}}
{{- define "cachepool.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "cachepool.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Refusals the schema cannot express. */}}
{{- define "cachepool.validate" -}}
{{- if and (gt (int .Values.web.replicas) 1) (or (eq .Values.web.database.type "sqlite") (eq .Values.web.images.store "pvc")) }}
{{- fail "web.replicas > 1 needs web.database.type=postgres and web.images.store=s3: SQLite and the image directory live on one ReadWriteOnce volume" }}
{{- end }}
{{- if and (eq .Values.web.database.type "postgres") (not .Values.web.database.postgres.existingSecret) }}
{{- fail "web.database.type=postgres needs web.database.postgres.existingSecret: the Secret holding the postgres:// URL" }}
{{- end }}
{{- if and (eq .Values.web.images.store "s3") (not .Values.web.images.s3.bucket) }}
{{- fail "web.images.store=s3 needs web.images.s3.bucket" }}
{{- end }}
{{- if and .Values.pool.enabled (eq .Values.pool.provider "ec2") (not .Values.operator.aws.enabled) }}
{{- fail "pool.provider=ec2 needs operator.aws.enabled=true (the operator's EC2 provider)" }}
{{- end }}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection) }}
{{- fail "operator.replicas > 1 needs operator.leaderElection=true: two replicas without it would both act" }}
{{- end }}
{{- end }}
